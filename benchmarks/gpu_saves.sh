#!/usr/bin/env bash
# Asynchronous checkpoint saves (checkpoint.async_save) on one H100/H200, in about 6 minutes:
# gpt2_125m and gpt2_1.3b in bf16 at ZeRO 1, the same run with synchronous and with asynchronous
# saves (benchmarks/checkpoint_io.py --async-only): the blocking part of an asynchronous save against
# a synchronous save (target at most 10%) and the step time while a background write runs against
# normal steps (target within 15%). Saves are spaced further apart than a write takes, as a real run's.
#
#   bash benchmarks/gpu_saves.sh [OUT_DIR]      (repository root; makes data/builtin if missing)
set -uo pipefail
out="${1:-${OUT:-runs/gpu_saves}}"
source "$(dirname "$0")/gpu_env.sh"
df -h /dev/shm /tmp | tee "$out/disks.txt"  # the host copy lives in /dev/shm; the checkpoints in /tmp

echo "== asynchronous saves, gpt2_125m bf16 ZeRO 1 (200 steps, a save every 50)"
timeout 200 python3 benchmarks/checkpoint_io.py --async-only --async-config configs/gpt2_125m.yaml \
  --async-iters 200 --async-save-interval 50 \
  --async-override train.micro_batch_size=16 train.global_batch_size=16 train.precision=bf16 \
  deepspeed_config=configs/deepspeed/zero1.json > "$out/async_saves_125m.json" 2>&1
echo "exit $?"; tail -18 "$out/async_saves_125m.json"

echo "== asynchronous saves, gpt2_1.3b bf16 ZeRO 1 (90 steps, a save every 30; about 21 GB per save)"
timeout 330 python3 benchmarks/checkpoint_io.py --async-only --async-config configs/gpt2_1.3b.yaml \
  --async-iters 90 --async-save-interval 30 \
  --async-override train.micro_batch_size=8 train.global_batch_size=8 train.precision=bf16 \
  deepspeed_config=configs/deepspeed/zero1.json > "$out/async_saves_1.3b.json" 2>&1
echo "exit $?"; tail -18 "$out/async_saves_1.3b.json"
