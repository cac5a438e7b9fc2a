#!/usr/bin/env bash
# Installs llm with the test tools into .venv, then runs lint, type checks and the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
# DeepSpeed compiles a small C++ op on first use; keep it with this checkout's environment so two
# checkouts (or a killed build's stale lock) never share one build directory.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
ruff check llm scripts tests benchmarks
mypy
# Two pytest workers (pytest-xdist): run one at a time, the tests kept 0.96 of the 2 cores busy (a
# test is mostly one process importing torch, or waiting on another). Work stealing: each worker
# starts on half of the tests and an idle one takes half of the other's queue, so neither waits at
# the end (xdist's default hands out fixed chunks: one worker ran its last chunk of long integration
# tests minutes after the other had finished; README, Tests). No test may depend on another having
# run in the same process. LLM_TEST_WORKERS=0: serial.
set +e
python -m pytest -n "${LLM_TEST_WORKERS:-2}" --dist worksteal "$@"
rc=$?
set -e
# pytest exits 5 when a filter selects no test: that is a failure of the filter, say so.
if [ "$rc" -eq 5 ]; then echo "no tests were selected" >&2; exit 1; fi
exit "$rc"
