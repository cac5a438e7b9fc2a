#!/usr/bin/env bash
# train.precision: fp8 against bf16 on one H100/H200, in about 5 minutes (the third GPU call, after
# benchmarks/gpu_check.sh and benchmarks/gpu_profile.sh):
#
# 1. gpt2_125m, the same 200 steps in bf16 and in fp8 (compiled blocks, ZeRO 1, micro-batch 16):
#    the losses (fp8 within 1% of bf16 is the target) and tokens/s.
# 2. llama_1b, 12 steps each in bf16 and fp8, eager and compiled: tokens/s, MFU, peak memory.
# 3. A 4-block fine-grained MoE, 12 steps each in bf16 and fp8 (the routed experts' grouped GEMMs).
# 4. The FP8 CUDA tests (cuBLAS FP8 GEMMs against float8-rounded operands, the experts' grouped ones).
#
#   bash benchmarks/gpu_fp8.sh [OUT_DIR]      (repository root; makes data/builtin if missing)
set -uo pipefail
out="${1:-${OUT:-runs/gpu_fp8}}"
source "$(dirname "$0")/gpu_env.sh"
runs=/tmp/gpu_fp8_runs
rm -rf "$runs"
common=(data.train_data_path=data/builtin/builtin_text_document data.split=98,2,0 eval.eval_interval=100000
        eval.eval_iters=1 logging.wandb_mode=disabled checkpoint.save_interval=null
        deepspeed_config=configs/deepspeed/zero1.json)

echo "== gpt2_125m, 200 steps, bf16 then fp8 (compiled)"
for precision in bf16 fp8; do
  timeout 200 python3 scripts/pretrain.py --config configs/gpt2_125m.yaml "${common[@]}" train.precision=$precision \
    train.train_iters=200 train.lr_warmup_iters=20 train.micro_batch_size=16 train.global_batch_size=16 \
    model.compile=true logging.log_interval=10 logging.dir=$runs/125m_$precision > "$out/125m_$precision.log" 2>&1
  echo "$precision exit $?"; tail -2 "$out/125m_$precision.log"
done
python3 - "$runs" <<'PY' | tee "$out/125m_fp8_vs_bf16.txt"
import json, statistics, sys
runs = sys.argv[1]
def read(name):
    try:
        return [json.loads(l) for l in open(f"{runs}/{name}/metrics.jsonl") if l.strip()]
    except OSError:
        return []
b, f = read("125m_bf16"), read("125m_fp8")
lb = {r["iteration"]: r["loss"] for r in b if "loss" in r}
lf = {r["iteration"]: r["loss"] for r in f if "loss" in r}
common = sorted(set(lb) & set(lf))
if common:
    rel = [abs(lf[i] - lb[i]) / lb[i] for i in common]
    print(f"iterations {common[0]}-{common[-1]}: largest |fp8 - bf16| / bf16 = {max(rel):.4f}, "
          f"last 50 steps' mean: bf16 {statistics.mean(lb[i] for i in common[-5:]):.4f}, "
          f"fp8 {statistics.mean(lf[i] for i in common[-5:]):.4f}")
for name, rs in (("bf16", b), ("fp8", f)):
    steady = [r["tokens_per_sec"] for r in rs if "tokens_per_sec" in r and r["iteration"] > 50]
    if steady:
        print(name, "median tokens/s after step 50:", statistics.median(steady))
PY

echo "== llama_1b, 12 steps, bf16 and fp8, eager and compiled, micro-batch 8"
for precision in bf16 fp8; do
  for compile in false true; do
    name=llama_1b_${precision}_compile_$compile
    timeout 150 python3 scripts/pretrain.py --config configs/llama_1b.yaml "${common[@]}" \
      train.precision=$precision model.compile=$compile train.train_iters=12 train.lr_warmup_iters=2 \
      train.micro_batch_size=8 train.global_batch_size=8 logging.log_interval=1 logging.dir=$runs/$name \
      > "$out/$name.log" 2>&1
    echo "$name exit $?"
    steady_steps "$runs/$name" 5 | tee "$out/$name.txt"
  done
done

echo "== a fine-grained MoE (moe_fine_grained_a2b cut to 4 blocks: 64 experts of 1408, top-6), 12 steps, bf16 and fp8"
# bf16 experts: torch._grouped_mm; fp8: torch._scaled_grouped_mm with row-wise scales (llm.parallel.fp8)
for precision in bf16 fp8; do
  name=moe_4l_$precision
  timeout 150 python3 scripts/pretrain.py --config configs/moe_fine_grained_a2b.yaml "${common[@]}" \
    model.num_layers=4 "model.moe_layer_freq=[0, 1, 1, 1]" model.seq_length=2048 parallel.expert_model_parallel_size=1 \
    train.precision=$precision train.train_iters=12 train.lr_warmup_iters=2 train.micro_batch_size=4 \
    train.global_batch_size=4 logging.log_interval=1 logging.dir=$runs/$name > "$out/$name.log" 2>&1
  echo "$name exit $?"
  steady_steps "$runs/$name" 5 | tee "$out/$name.txt"
done

echo "== FP8 CUDA test"
timeout 120 python3 -m pytest -q -m gpu tests/gpu -k fp8 > "$out/fp8_tests.log" 2>&1; tail -3 "$out/fp8_tests.log"
