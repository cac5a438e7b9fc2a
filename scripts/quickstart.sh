#!/usr/bin/env bash
# The main job on the built-in default: install, tokenize the built-in corpus, pretrain a tiny GPT
# on CPU with DeepSpeed, report its perplexity on held-out text and print a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$SECONDS
# DeepSpeed compiles a small C++ op on first use; keep it with this checkout's environment so two
# checkouts (or a killed build's stale lock) never share one build directory.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
PREFIX=data/builtin/builtin_text_document
if [ ! -f "$PREFIX.idx" ]; then
  python scripts/preprocess_data.py --builtin-corpus --tokenizer tokenizer/llm_sp8k.model \
    --output-prefix "$PREFIX" --workers 2 --no-progress
fi
deepspeed --num_gpus 1 scripts/pretrain.py --config configs/tiny_cpu.yaml "$@"
python scripts/evaluate.py --checkpoint runs/tiny_cpu/checkpoints --data "$PREFIX" --split valid
python scripts/generate.py --checkpoint runs/tiny_cpu/checkpoints --prompt "The built-in function" \
  --max-new-tokens 60 --temperature 0.7 --top-k 40 --seed 0
python scripts/plot_runs.py runs/tiny_cpu --output runs/tiny_cpu/curves.png
echo "quickstart: data, training, evaluation, sample and curves in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s (after setup)"
