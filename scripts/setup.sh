#!/usr/bin/env bash
# Creates .venv (if missing) and installs llm with its dependencies. `--dev` adds the test tools.
# torch is pinned first so pip takes the CPU wheel where one is provided (an unpinned torch would
# pull a multi-GB CUDA build on a CPU machine); on a GPU machine the same pin installs CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRA=""
[ "${1:-}" = "--dev" ] && EXTRA="[dev]"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".${EXTRA}"
echo "setup: $(.venv/bin/python -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "deepspeed", "transformers")))')"
