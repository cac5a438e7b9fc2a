"""Host-device synchronisations per training step through each of DeepSpeed's mixed-precision paths.

  python benchmarks/engine_syncs.py [--smoke]

Each variant runs in its own process: a 2-layer GPT (width 32, 16 tokens, micro-batch 2, 2 micro-batches
per step) through pretrain.py's own engine set-up (`llm.training.pretrain.build_engine`), one
step to build the optimizer state, then 3 steps during which every call of a tensor method that would
make the host wait for a GPU (tests/distributed/test_host_syncs.py's list) is counted, in any code:
llm's, DeepSpeed's, torch's. Which wrapper DeepSpeed picks follows the precision, the ZeRO stage and
`data_types.grad_accum_dtype` (`DeepSpeedEngine._do_optimizer_sanity_check`). torch's single-tensor AdamW
reads its step count on the CPU (`torch/optim/optimizer.py`); the fused CUDA AdamW a GPU run uses does
not, so those calls are reported apart. On CPU no call waits; on a GPU each one does.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, report

METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
VARIANTS = {  # name: (precision, DeepSpeed JSON)
    "fp32_zero0": ("fp32", {"zero_optimization": {"stage": 0}}),
    "bf16_zero0": ("bf16", {"zero_optimization": {"stage": 0}}),
    "bf16_zero1": ("bf16", {"zero_optimization": {"stage": 1}}),
    "bf16_zero2": ("bf16", {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}}),
    "bf16_zero1_fp32_grads": ("bf16", {"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}),
}


def one_variant(precision: str, ds_json: str, port: int) -> dict:
    """In this process: the counts of one variant (run as `engine_syncs.py --variant`)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from llm.config import load_config
    from llm.engine.comm import init_distributed
    from llm.engine.deepspeed_config import deepspeed_setup
    from llm.parallel.process_groups import ParallelContext
    from llm.training.pretrain import build_engine

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
                             "model.seq_length=16", "model.vocab_size=300", "train.micro_batch_size=2",
                             "train.global_batch_size=4", f"train.precision={precision}", "train.lr_warmup_iters=1",
                             f"deepspeed_config={ds_json}"])  # fmt: skip
    init_distributed()
    ctx = ParallelContext.build()
    ds, plan = deepspeed_setup(cfg, 1, cuda=False)
    steps, _ = build_engine(cfg, ctx, ds, plan)  # pretrain.py's own set-up
    gen = torch.Generator().manual_seed(0)
    batches = iter([torch.randint(0, 300, (2, 17), generator=gen) for _ in range(20)])
    steps.train(batches, None, 4)  # the first step builds the optimizer state
    found: collections.Counter[str] = collections.Counter()
    for name in METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _original: object = original, _name: str = name,
                    **kwargs: object) -> object:  # fmt: skip
            frame = sys._getframe(1)
            where = frame.f_code.co_filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
            found[f"{where}:{frame.f_lineno} {_name}"] += 1
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        setattr(torch.Tensor, name, counted)
    for _ in range(3):
        steps.train(batches, None, 4)
    torch_optim = sum(n for k, n in found.items() if k.startswith("torch/optim/"))
    return {
        "optimizer_wrapper": type(steps.engine.optimizer).__name__,
        "syncs_per_step": round((sum(found.values()) - torch_optim) / 3, 2),
        "single_tensor_adamw_step_reads_per_step": round(torch_optim / 3, 2),
        "where": dict(found.most_common(6)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="seconds: one variant")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in its own process
    args = parser.parse_args()
    if args.variant:
        precision, ds = VARIANTS[args.variant]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ds.json"
            path.write_text(json.dumps(ds))
            print(json.dumps(one_variant(precision, str(path), 29300 + list(VARIANTS).index(args.variant))))
        return
    results = {}
    for name in ["bf16_zero1_fp32_grads"] if args.smoke else VARIANTS:
        p = subprocess.run([sys.executable, __file__, "--variant", name], cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{name} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        results[name] = json.loads(p.stdout.strip().splitlines()[-1])
    report("engine_syncs", results)


if __name__ == "__main__":
    main()
