#!/usr/bin/env bash
# Where a training step's time goes on one H100/H200, in one call of about 8 minutes (the second GPU
# call, after benchmarks/gpu_check.sh):
#
# 1. gpt2_125m, gpt2_1.3b and llama_1b, eager and compiled (model.compile): scripts/pretrain.py in bf16
#    at ZeRO 0 on the one GPU, 8 iterations of one micro-batch each (the planner estimates each fits:
#    scripts/plan.py --gpus-per-node 1 --gpu-memory 139), iterations 6-7 profiled
#    (logging.profile_step_start/end): tokens/s, TFLOP/s and MFU from metrics.jsonl (model FLOPs with
#    attention, llm/model/flops.py; 989 TFLOP/s dense bf16 peak), and the per-step table (data,
#    forward, backward, optimizer step, collectives, device busy and idle).
# 2. llama_1b_32k at C = 1 on the one GPU (activation checkpointing): tokens/s and peak memory at 32k.
# 3. The LM head and loss over chunks of tokens against the whole logits: peak memory and time in bf16
#    (benchmarks/loss_memory.py --device cuda).
#
# Asynchronous saves on a GPU are benchmarks/gpu_saves.sh's.
#
#   bash benchmarks/gpu_profile.sh [OUT_DIR]      (repository root; makes data/builtin if missing)
set -uo pipefail
out="${1:-${OUT:-runs/gpu_profile}}"
source "$(dirname "$0")/gpu_env.sh"
runs=/tmp/gpu_profile_runs
rm -rf "$runs"
data=(data.train_data_path=data/builtin/builtin_text_document data.split=98,2,0)
short=(train.train_iters=8 train.lr_warmup_iters=2 eval.eval_interval=1000 eval.eval_iters=1
       logging.log_interval=1 logging.wandb_mode=disabled checkpoint.save_interval=null
       logging.profile_step_start=6 logging.profile_step_end=7 train.precision=bf16
       deepspeed_config=configs/deepspeed/zero0.json)

summary() {  # run directory -> the steady steps' throughput (profiled iterations 6-7 left out) and the profile table
  steady_steps "$1" 4 6 7
  cat "$1/profile/summary_rank00000.txt" 2>/dev/null || echo "no profile in $1/profile"
}

for preset in "gpt2_125m 16" "gpt2_1.3b 8" "llama_1b 8"; do
  set -- $preset
  name=$1 micro=$2
  for mode in eager compiled; do
    compile=false; [ "$mode" = compiled ] && compile=true
    dir=$runs/${name}_$mode
    echo "== $name, $mode, micro-batch $micro"
    timeout 150 python3 scripts/pretrain.py --config configs/$name.yaml "${data[@]}" "${short[@]}" \
      train.micro_batch_size=$micro train.global_batch_size=$micro model.compile=$compile logging.dir=$dir \
      > "$out/${name}_$mode.log" 2>&1
    echo "exit $?"
    summary "$dir" | tee "$out/${name}_$mode.txt"
  done
done

echo "== llama_1b_32k, C = 1, one GPU, activation checkpointing"
timeout 150 python3 scripts/pretrain.py --config configs/llama_1b_32k.yaml "${data[@]}" "${short[@]}" \
  parallel.context_parallel_size=1 train.micro_batch_size=1 train.global_batch_size=1 \
  model.activation_checkpointing=true logging.dir=$runs/llama_1b_32k > "$out/llama_1b_32k.log" 2>&1
echo "exit $?"
summary "$runs/llama_1b_32k" | tee "$out/llama_1b_32k.txt"

echo "== the LM head and loss over chunks of tokens (model.loss_chunk_tokens), bf16, 16k tokens x 50k vocabulary"
timeout 60 python3 benchmarks/loss_memory.py --device cuda --tokens 16384 > "$out/loss_memory_gpu.json" 2>&1
echo "exit $?"; tail -25 "$out/loss_memory_gpu.json"
