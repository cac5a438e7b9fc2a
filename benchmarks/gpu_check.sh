#!/usr/bin/env bash
# What only a GPU shows, in one pass (a few minutes on one H100/H200): the NCCL + bf16 + FusedAdam
# training path of scripts/pretrain.py, tokens/s and MFU of the GPT-2 125M preset, an exact bf16
# resume, the model step of ours against transformers' GPT-2 under bf16 autocast, an MoE layer's grouped
# GEMMs against the per-expert loop, and the CUDA tests (tests/gpu).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (from the repository root; makes data/builtin if missing)
#
# Where the step's time goes (profiles, MFU of the 1B presets, 32k tokens, async saves) is the second
# call: benchmarks/gpu_profile.sh.
#
# Environment: WHEELS=dir installs the wheels/sdists found there first (a machine without network).
set -uo pipefail
out="${1:-${OUT:-runs/gpu_check}}"
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

run_dir=/tmp/gpu_check_runs
rm -rf "$run_dir"
common=(--config configs/gpt2_125m.yaml data.train_data_path=data/builtin/builtin_text_document
        data.split=95,5,0 train.micro_batch_size=16 train.global_batch_size=16 train.lr_warmup_iters=5
        train.train_iters=40 eval.eval_interval=1000 eval.eval_iters=1 logging.log_interval=5
        logging.wandb_mode=disabled checkpoint.keep_last=null)

echo "== pretrain gpt2_125m, bf16, NCCL, 40 iterations, checkpoint at 20"
timeout 420 python3 scripts/pretrain.py "${common[@]}" logging.dir=$run_dir/a checkpoint.save_interval=20 \
  > "$out/pretrain_a.log" 2>&1; echo "exit $?"; tail -4 "$out/pretrain_a.log"
echo "== resume from iteration 20 into another run directory"
timeout 300 python3 scripts/pretrain.py "${common[@]}" logging.dir=$run_dir/b checkpoint.save_interval=null \
  checkpoint.resume=$run_dir/a/checkpoints/iter_0000020 > "$out/pretrain_b.log" 2>&1; echo "exit $?"
tail -2 "$out/pretrain_b.log"
echo "== the first run again from scratch: how far two fresh runs differ on this GPU"
timeout 300 python3 scripts/pretrain.py "${common[@]}" logging.dir=$run_dir/c checkpoint.save_interval=null \
  > "$out/pretrain_c.log" 2>&1; echo "exit $?"
cp $run_dir/c/metrics.jsonl "$out/metrics_c.jsonl" 2>/dev/null
cp $run_dir/a/metrics.jsonl "$out/metrics_a.jsonl" 2>/dev/null
cp $run_dir/b/metrics.jsonl "$out/metrics_b.jsonl" 2>/dev/null
python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
def read(name):
    try:
        return [json.loads(l) for l in open(f"{out}/{name}") if l.strip()]
    except OSError:
        return []
a, b, c = read("metrics_a.jsonl"), read("metrics_b.jsonl"), read("metrics_c.jsonl")
steps = [r for r in a if "tokens_per_sec" in r and r["iteration"] > 10]
if steps:
    keys = ("iteration", "loss", "tokens_per_sec", "mfu", "tflops_per_gpu", "memory_allocated_gb", "step_time")
    for r in steps:
        print({k: r.get(k) for k in keys})
def losses(rs):
    return {r["iteration"]: r["loss"] for r in rs if "loss" in r}
for name, x, y in (("resume at 20 vs uninterrupted", a, b), ("two fresh runs", a, c)):
    lx, ly = losses(x), losses(y)
    common = sorted(set(lx) & set(ly))
    if common:
        print(f"{name}: iterations {common[0]}-{common[-1]}, max |loss difference| =",
              max(abs(lx[i] - ly[i]) for i in common), "identical:", all(lx[i] == ly[i] for i in common))
EOF

echo "== model step, bf16 autocast, ours vs transformers GPT-2"
timeout 240 python3 benchmarks/model_throughput.py --device cuda --dtype bf16 --shape gpt2:12:768:12:1024:16 \
  --repeats 10 > "$out/model_throughput_125m.json" 2>&1; cat "$out/model_throughput_125m.json" | tail -20

echo "== MoE layer: grouped GEMMs (torch._grouped_mm) vs the per-expert loop, bf16"
timeout 180 python3 benchmarks/moe.py --device cuda --repeats 5 > "$out/moe_gpu.json" 2>&1; tail -20 "$out/moe_gpu.json"
echo "== CUDA tests (bf16 model, grouped-GEMM experts against the loop)"
timeout 180 python3 -m pytest -q -s -m gpu tests/gpu > "$out/gpu_tests.log" 2>&1; tail -3 "$out/gpu_tests.log"
