#!/usr/bin/env bash
# The model options on a GPU (a few minutes on one H100/H200): the step of ours against a plain
# PyTorch GPT and transformers under bf16 autocast, eager and compiled (model.compile); the
# document-aware attention path (data.reset_attention_mask: torch's variable-length flash
# attention) against plain causal attention and a block-diagonal mask, checked equal; and a short
# bf16 NCCL pretrain with document-aware training, parallel blocks and compiled blocks together.
#
#   WHEELS=dir bash benchmarks/gpu_model_check.sh OUT_DIR     (repository root; needs data/builtin)
set -uo pipefail
out="${1:-${OUT:-runs/gpu_model_check}}"
source "$(dirname "$0")/gpu_env.sh"

echo "== document attention: one variable-length flash call vs one causal call vs a block mask (bf16, B 8, 12 heads, S 2048, d 64)"
timeout 120 python3 - <<'PY' 2>&1 | tee "$out/document_attention.txt"
import time, torch, torch.nn.functional as F
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

echo "== model step, bf16 autocast: ours / plain PyTorch / transformers, and ours compiled (125M GPT-2)"
timeout 300 python3 benchmarks/model_throughput.py --device cuda --dtype bf16 --shape gpt2:12:768:12:1024:16 \
  --repeats 10 --compile > "$out/model_throughput_gpt2_125m.json" 2>&1; grep -v "^\[" "$out/model_throughput_gpt2_125m.json" | tail -24
echo "== the same for the llama preset (12 x 768, 2 KV groups), eager"
timeout 200 python3 benchmarks/model_throughput.py --device cuda --dtype bf16 --shape llama:12:768:12:1024:16 \
  --repeats 10 > "$out/model_throughput_llama.json" 2>&1; grep -v "^\[" "$out/model_throughput_llama.json" | tail -14

echo "== pretrain gpt2_125m bf16 NCCL, 30 iterations: document-aware + parallel blocks + compiled blocks"
timeout 240 python3 scripts/pretrain.py --config configs/gpt2_125m.yaml data.train_data_path=data/builtin/builtin_text_document \
  data.split=95,5,0 train.micro_batch_size=16 train.global_batch_size=16 train.lr_warmup_iters=5 train.train_iters=30 \
  eval.eval_interval=1000 eval.eval_iters=1 logging.log_interval=5 logging.wandb_mode=disabled checkpoint.save_interval=null \
  data.reset_attention_mask=true data.reset_position_ids=true data.eod_mask_loss=true model.parallel_block=true \
  model.compile=true logging.dir=/tmp/gpu_model_check_run > "$out/pretrain_options.log" 2>&1; echo "exit $?"
grep -E "iter +(5|10|20|30)/|error|Error" "$out/pretrain_options.log" | tail -6
