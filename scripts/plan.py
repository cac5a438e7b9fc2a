"""Plan a parallel layout: candidates with memory per GPU, pipeline bubble, step FLOPs and time.

python scripts/plan.py --config configs/llama_7b.yaml --nodes 2 --gpus-per-node 8 [--gpu-memory 80]
python scripts/plan.py --config configs/cluster/llama_70b_tp8_pp8.yaml --nodes 16 --gpus-per-node 8 --top 5
python scripts/plan.py --config ... --nodes 1 --gpus-per-node 8 --json     # every candidate as JSON
"""

from __future__ import annotations

import argparse
import json
import sys

from llm.config import ConfigError, load_config
from llm.errors import LLMError
from llm.planner.memory import GB
from llm.planner.report import config_vocab, format_table
from llm.planner.search import Cluster, plan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="model/train YAML (its global batch size is kept)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100: 989)")
    p.add_argument("--precision", choices=("bf16", "fp8", "fp32"),
                   help="default: the config's train.precision (auto and fp16 plan as bf16); fp8 runs the "
                   "bf16 engine with float8 linear layers (smaller saved activations; their GEMMs "
                   "--fp8-gemm-speedup times faster)")  # fmt: skip
    p.add_argument("--fp8-gemm-speedup", type=float, default=Cluster.fp8_gemm_speedup,
                   help="with --precision fp8: the float8 GEMMs' speed over bf16 in a step (default "
                   f"{Cluster.fp8_gemm_speedup:g}, assumed from torchtitan's published gains; "
                   "benchmarks/gpu_check.sh measures yours)")  # fmt: skip
    p.add_argument("--top", type=int, default=10, help="rows to show")
    p.add_argument("--json", action="store_true", help="print every candidate as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for pretrain.py")
    args = p.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.nodes < 1 or args.gpus_per_node < 1 or args.gpu_memory <= 0 or args.fp8_gemm_speedup <= 0:
            raise ConfigError("--nodes, --gpus-per-node, --gpu-memory and --fp8-gemm-speedup must be positive")
        vocab = config_vocab(cfg)
        precision = args.precision or {"auto": "bf16", "fp16": "bf16"}.get(cfg.train.precision, cfg.train.precision)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cluster = Cluster(args.nodes, args.gpus_per_node, gpu_memory_gb=args.gpu_memory, peak_tflops=args.peak_tflops,
                      fp8_gemm_speedup=args.fp8_gemm_speedup)  # fmt: skip
    cands = plan(cfg, cluster, precision=precision, vocab=vocab)
    if not cands:
        print("error: no layout divides this cluster and the global batch size; change "
              "train.global_batch_size or the number of GPUs", file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps([c.to_dict() for c in cands]))
        return 0
    print(format_table(cfg, cluster, cands, vocab=vocab, top=args.top, precision=precision))
    if not cands[0].fits:
        print(f"\nnothing fits {args.gpu_memory:g} GiB per GPU: the smallest needs "
              f"{min(c.memory.total for c in cands) / GB:.1f} GiB; add GPUs or shorten model.seq_length")  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
