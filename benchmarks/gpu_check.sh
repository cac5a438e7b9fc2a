#!/usr/bin/env bash
# Everything only a GPU shows, in one call on one H100/H200: the parts below, most wanted first, within
# a time budget. A device lease is about 15 minutes in all (the machine's start included), so one call
# cannot run every part: it runs what fits in BUDGET_S (default 480 s), skips the rest, and ends its
# summary with the PARTS= line that runs what was left (the next lease's call).
#
#   bash benchmarks/gpu_wheels.sh                 (here, with network: DeepSpeed and its needs into .whl/)
#   WHEELS=.whl bash benchmarks/gpu_check.sh OUT_DIR
#   WHEELS=.whl PARTS=llama_1b_compiled,async_saves_125m bash benchmarks/gpu_check.sh OUT_DIR
#
# Through the device tool: run(command="WHEELS=.whl bash benchmarks/gpu_check.sh $OUT", carry=[".whl"],
# timeout_s=600). What comes back is two files: OUT_DIR/summary.txt (each part: exit, seconds, result
# lines) and OUT_DIR/logs.tgz (every log, table and metrics file). data/builtin is made there if missing.
# EXTRA="key=value ..." adds overrides to every pretrain.py run (a 1-layer model: the flow on a CPU).
#
# The parts (estimated seconds on one H200; the summary records the real ones):
#   cuda_tests          tests/gpu: bf16 model, FP8 GEMMs against float8-rounded fp32, grouped-GEMM experts,
#                       async-save host copies of CUDA tensors (pinned, the synchronous save's bytes)
#   llama_1b            llama_1b, bf16, eager, its ZeRO 2 JSON, micro-batch 8 (the planner's for one GPU):
#   gpt2_1.3b           tokens/s, MFU (model FLOPs with attention, llm/model/flops.py, of 989 TFLOP/s) and the
#                       step's split from the step profiler (iterations 6-7; llm/training/profile.py)
#   bf16_engines        llama_1b as above through DeepSpeed's other bf16 optimizers: ZeRO 0 (its unfused
#                       mixed-precision wrapper: a host sync per parameter tensor), ZeRO 1 (bf16 gradients),
#                       ZeRO 1 with fp32 gradient accumulation (its BF16_Optimizer); docs/benchmarks.md
#   overhead_125m       gpt2_125m: scripts/pretrain.py's step against the bare loop (fused AdamW, bf16
#                       autocast; benchmarks/framework_overhead.py --device cuda; target at least 0.9x)
#   fp8_125m            gpt2_125m, the same 200 steps in bf16 and fp8: the largest relative loss difference
#                       (target within 1%) and tokens/s
#   llama_1b_fp8        as llama_1b in fp8 (tokens/s against llama_1b's)
#   llama_1b_compiled, llama_1b_fp8_compiled, gpt2_1.3b_compiled: the same with model.compile
#   async_saves_125m    checkpoint.async_save against synchronous saves (benchmarks/checkpoint_io.py): the
#                       blocking part (target at most 10% of a save) and steps during a write (within 15%)
#   moe_fp8             a fine-grained MoE (moe_fine_grained_a2b cut to 4 blocks), 12 steps in bf16 and fp8:
#                       the experts' grouped GEMMs, torch._grouped_mm against torch._scaled_grouped_mm
#   gpt2_125m_profile   gpt2_125m eager and compiled, profiled (why compiled is slower under DeepSpeed)
#   resume_125m         gpt2_125m 40 steps, a resume at 20 into another directory, a second fresh run:
#                       the resume's loss difference against two fresh runs' (GPU non-determinism)
#   model_step_125m     the model's forward+backward: ours, a plain PyTorch GPT and transformers', compiled too
#   moe_layer           benchmarks/moe.py: the grouped GEMMs against the per-expert loop
#   llama_1b_32k        32k tokens at context parallelism 1 on one GPU (activation checkpointing)
#   loss_memory         the LM head and loss over chunks of tokens against whole logits, bf16
#   document_attention  variable-length flash attention against one causal call and a block mask
#   pretrain_options    gpt2_125m with document-aware training, parallel blocks and compiled blocks
#   async_saves_1.3b    as async_saves_125m for gpt2_1.3b (about 21 GB per save in /dev/shm)
set -uo pipefail
final="${1:-${OUT:-runs/gpu_check}}"
BUDGET_S="${BUDGET_S:-480}"
ALL=(cuda_tests llama_1b gpt2_1.3b bf16_engines overhead_125m fp8_125m llama_1b_fp8 llama_1b_compiled llama_1b_fp8_compiled
     gpt2_1.3b_compiled async_saves_125m moe_fp8 gpt2_125m_profile resume_125m model_step_125m moe_layer
     llama_1b_32k loss_memory document_attention pretrain_options async_saves_1.3b)
declare -A EST=([cuda_tests]=120 [llama_1b]=70 [gpt2_1.3b]=70 [bf16_engines]=210 [overhead_125m]=80 [fp8_125m]=100
  [llama_1b_fp8]=70 [llama_1b_compiled]=110 [llama_1b_fp8_compiled]=110 [gpt2_1.3b_compiled]=110
  [async_saves_125m]=150 [moe_fp8]=140 [gpt2_125m_profile]=120 [resume_125m]=150 [model_step_125m]=120
  [moe_layer]=60 [llama_1b_32k]=100 [loss_memory]=50 [document_attention]=40 [pretrain_options]=120
  [async_saves_1.3b]=330)
read -r -a extra <<< "${EXTRA:-}"  # overrides for every pretrain.py run (e.g. a 1-layer model: the flow on a CPU)
IFS=, read -r -a chosen <<< "${PARTS:-$(IFS=,; echo "${ALL[*]}")}"
for part in "${chosen[@]}"; do
  [ -n "${EST[$part]:-}" ] || { echo "unknown part '$part'; the parts: ${ALL[*]}" >&2; exit 2; }
done

out=/tmp/gpu_check_out  # every log and table, packed into $final/logs.tgz at the end
runs=/tmp/gpu_check_runs
rm -rf "$out" "$runs"
mkdir -p "$final"
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" | tee "$out/versions.txt"
begin=$SECONDS

run_for() {  # seconds command... : the command, stopped at its own limit or 60 s past the budget
  local limit=$1 left=$((BUDGET_S + 60 - (SECONDS - begin)))
  shift
  ((left < limit)) && limit=$((left > 10 ? left : 10))
  timeout "$limit" "$@"
}

data=(data.train_data_path=data/builtin/builtin_text_document data.split=98,2,0 eval.eval_interval=100000
      eval.eval_iters=1 logging.wandb_mode=disabled checkpoint.save_interval=null)
# 8 iterations of one micro-batch, 6-7 profiled: the throughput of the steady steps and where a step's time
# goes (each preset's own DeepSpeed JSON: ZeRO 1 for gpt2_125m, 2 for the 1B presets)
profiled=(train.train_iters=8 train.lr_warmup_iters=2 logging.log_interval=1 logging.profile_step_start=6
          logging.profile_step_end=7)

pretrain() {  # name limit args... : scripts/pretrain.py into $runs/name, its log $out/name.log
  local name=$1 limit=$2
  shift 2
  run_for "$limit" python3 scripts/pretrain.py "$@" "${extra[@]}" logging.dir="$runs/$name" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc"
  ((rc == 0)) || grep -E "Error|error|Traceback" "$out/$name.log" | tail -4
  cp "$runs/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
  return 0
}

profiled_run() {  # name config micro-batch [overrides...]: tokens/s, MFU and the profile table of 8 steps
  local name=$1 config=$2 micro=$3
  shift 3
  pretrain "$name" 240 --config "configs/$config.yaml" "${data[@]}" "${profiled[@]}" train.micro_batch_size="$micro" \
    train.global_batch_size="$micro" "$@"
  steady_steps "$runs/$name" 4 6 7
  cat "$runs/$name/profile/summary_rank00000.txt" 2>/dev/null || echo "no profile table for $name"
}

part_cuda_tests() {
  run_for 300 python3 -m pytest -q -m gpu tests/gpu > "$out/gpu_tests.log" 2>&1
  echo "exit $?"
  tail -5 "$out/gpu_tests.log"
}

part_llama_1b() { profiled_run llama_1b llama_1b 8 train.precision=bf16; }
part_gpt2_1.3b() { profiled_run gpt2_1.3b gpt2_1.3b 8 train.precision=bf16; }
part_llama_1b_fp8() { profiled_run llama_1b_fp8 llama_1b 8 train.precision=fp8; }
part_llama_1b_compiled() { profiled_run llama_1b_compiled llama_1b 8 train.precision=bf16 model.compile=true; }
part_llama_1b_fp8_compiled() { profiled_run llama_1b_fp8_compiled llama_1b 8 train.precision=fp8 model.compile=true; }
part_gpt2_1.3b_compiled() { profiled_run gpt2_1.3b_compiled gpt2_1.3b 8 train.precision=bf16 model.compile=true; }
part_bf16_engines() {  # the JSON with fp32 gradient accumulation is the benchmark's own (untested in llm's checkpoints)
  mkdir -p "$runs"
  echo '{"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}' > "$runs/zero1_fp32_grads.json"
  profiled_run llama_1b_zero0 llama_1b 8 train.precision=bf16 deepspeed_config=configs/deepspeed/zero0.json
  profiled_run llama_1b_zero1 llama_1b 8 train.precision=bf16 deepspeed_config=configs/deepspeed/zero1.json
  profiled_run llama_1b_zero1_fp32_grads llama_1b 8 train.precision=bf16 deepspeed_config="$runs/zero1_fp32_grads.json"
}
part_gpt2_125m_profile() {
  profiled_run gpt2_125m_eager gpt2_125m 16 train.precision=bf16
  profiled_run gpt2_125m_compiled gpt2_125m 16 train.precision=bf16 model.compile=true
}

part_overhead_125m() {
  run_for 240 python3 benchmarks/framework_overhead.py --device cuda --iters 30 --config configs/gpt2_125m.yaml \
    data.split=98,2,0 train.micro_batch_size=16 train.global_batch_size=16 > "$out/overhead_125m.json" 2>&1
  echo "exit $?"
  grep -E "seconds|ratio" "$out/overhead_125m.json" || tail -3 "$out/overhead_125m.json"
}

part_fp8_125m() {
  for precision in bf16 fp8; do
    pretrain "fp8_125m_$precision" 200 --config configs/gpt2_125m.yaml "${data[@]}" train.precision=$precision \
      train.train_iters=200 train.lr_warmup_iters=20 train.micro_batch_size=16 train.global_batch_size=16 \
      logging.log_interval=10 deepspeed_config=configs/deepspeed/zero1.json
  done
  compare_losses "fp8 against bf16" "$runs/fp8_125m_bf16" "$runs/fp8_125m_fp8"
  steady_steps "$runs/fp8_125m_bf16" 51
  steady_steps "$runs/fp8_125m_fp8" 51
}

async_saves() {  # name config iterations interval micro-batch limit
  run_for "$6" python3 benchmarks/checkpoint_io.py --async-only --async-config "configs/$2.yaml" --async-iters "$3" \
    --async-save-interval "$4" --async-override train.micro_batch_size="$5" train.global_batch_size="$5" \
    train.precision=bf16 deepspeed_config=configs/deepspeed/zero1.json > "$out/$1.json" 2>&1
  echo "exit $?"
  tail -18 "$out/$1.json"
}
part_async_saves_125m() { df -h /dev/shm /tmp; async_saves async_saves_125m gpt2_125m 200 50 16 300; }
part_async_saves_1.3b() { df -h /dev/shm /tmp; async_saves async_saves_1.3b gpt2_1.3b 90 30 8 400; }

part_moe_fp8() {  # bf16 experts: torch._grouped_mm; fp8: torch._scaled_grouped_mm with row-wise scales (llm.parallel.fp8)
  for precision in bf16 fp8; do
    pretrain "moe_4l_$precision" 150 --config configs/moe_fine_grained_a2b.yaml "${data[@]}" model.num_layers=4 \
      "model.moe_layer_freq=[0, 1, 1, 1]" model.seq_length=2048 parallel.expert_model_parallel_size=1 \
      train.precision=$precision train.train_iters=12 train.lr_warmup_iters=2 train.micro_batch_size=4 \
      train.global_batch_size=4 logging.log_interval=1 deepspeed_config=configs/deepspeed/zero1.json
    steady_steps "$runs/moe_4l_$precision" 5
  done
}

part_resume_125m() {
  local common=(--config configs/gpt2_125m.yaml "${data[@]}" train.micro_batch_size=16 train.global_batch_size=16
                train.lr_warmup_iters=5 train.train_iters=40 logging.log_interval=5)
  pretrain resume_a 240 "${common[@]}" checkpoint.save_interval=20 checkpoint.keep_last=null
  pretrain resume_b 200 "${common[@]}" checkpoint.resume="$runs/resume_a/checkpoints/iter_0000020"
  pretrain resume_c 200 "${common[@]}"
  compare_losses "resume at 20 against the uninterrupted run" "$runs/resume_a" "$runs/resume_b"
  compare_losses "two fresh runs" "$runs/resume_a" "$runs/resume_c"
  steady_steps "$runs/resume_a" 10
}

part_model_step_125m() {
  run_for 300 python3 benchmarks/model_throughput.py --device cuda --dtype bf16 --shape gpt2:12:768:12:1024:16 \
    --repeats 10 --compile > "$out/model_step_125m.json" 2>&1
  echo "exit $?"
  grep -v "^\[" "$out/model_step_125m.json" | tail -24
}

part_moe_layer() {
  run_for 180 python3 benchmarks/moe.py --device cuda --repeats 5 > "$out/moe_layer.json" 2>&1
  echo "exit $?"
  tail -20 "$out/moe_layer.json"
}

part_llama_1b_32k() {
  pretrain llama_1b_32k 200 --config configs/llama_1b_32k.yaml "${data[@]}" "${profiled[@]}" train.precision=bf16 \
    parallel.context_parallel_size=1 train.micro_batch_size=1 train.global_batch_size=1 model.activation_checkpointing=true
  steady_steps "$runs/llama_1b_32k" 4 6 7
}

part_loss_memory() {
  run_for 120 python3 benchmarks/loss_memory.py --device cuda --tokens 16384 > "$out/loss_memory.json" 2>&1
  echo "exit $?"
  tail -25 "$out/loss_memory.json"
}

part_document_attention() {
  run_for 120 python3 - <<'PY'
import time, torch
import torch.nn.functional as F
from llm.model import layers
torch.manual_seed(0)
B, H, S, D = 8, 12, 2048, 64
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
ids = torch.randint(3, 1000, (B, S), device="cuda")
for b in range(B):  # 1 to 4 documents per sample
    for cut in torch.randint(1, S - 1, (b % 4,)).tolist():
        ids[b, cut] = 2
doc = layers.document_ids(ids, 2)
def timed(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3
def causal():
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
def per_doc():
    layers._document_attention(q, k, v, doc, dropout=0.0, gqa=False).sum().backward()
def dense():
    layers.USE_VARLEN = False
    try: layers._document_attention(q, k, v, doc, dropout=0.0, gqa=False).sum().backward()
    finally: layers.USE_VARLEN = True
print("varlen:", layers.varlen(), "documents per sample:", [len(s) for s in layers.document_spans(doc)])
fast = layers._document_attention(q, k, v, doc, dropout=0.0, gqa=False)
layers.USE_VARLEN = False
masked = layers._document_attention(q, k, v, doc, dropout=0.0, gqa=False); layers.USE_VARLEN = True
print("varlen vs block mask, max |difference|:", (fast.float() - masked.float()).abs().max().item())
print(f"fwd+bwd ms: causal one call {timed(causal):.2f}, varlen per document {timed(per_doc):.2f}, "
      f"block-diagonal mask {timed(dense):.2f}")
PY
}

part_pretrain_options() {
  pretrain pretrain_options 240 --config configs/gpt2_125m.yaml "${data[@]}" train.micro_batch_size=16 \
    train.global_batch_size=16 train.lr_warmup_iters=5 train.train_iters=30 logging.log_interval=5 \
    data.reset_attention_mask=true data.reset_position_ids=true data.eod_mask_loss=true model.parallel_block=true \
    model.compile=true
  steady_steps "$runs/pretrain_options" 10
}

summary="$out/summary.txt"
skipped=()
for part in "${chosen[@]}"; do
  left=$((BUDGET_S - (SECONDS - begin)))
  if ((EST[$part] > left)); then
    skipped+=("$part")
    continue
  fi
  echo "== $part (estimated ${EST[$part]} s, $left s of the budget left)" | tee -a "$summary"
  t0=$SECONDS
  "part_$part" 2>&1 | tee "$out/part_$part.txt" | tee -a "$summary"
  echo "-- $part: $((SECONDS - t0)) s" | tee -a "$summary"
done
if ((${#skipped[@]})); then
  echo "not run (over the ${BUDGET_S} s budget): PARTS=$(IFS=,; echo "${skipped[*]}")" | tee -a "$summary"
else
  echo "every chosen part ran" | tee -a "$summary"
fi
cp "$summary" "$final/summary.txt"
tar czf "$final/logs.tgz" -C "$out" . && ls -la "$final"
