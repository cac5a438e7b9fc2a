"""Host-device synchronisations in a training step: every call in llm's own code that would make the
host wait for a GPU (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `float()` / `int()` / `bool()` of a
tensor), counted by wrapping those tensor methods while `steps.train()` runs at DP 2 with two
micro-batches each. At most one per step: reading the step's loss, which spike detection needs every
step. The gradient norm stays a tensor until a log line reads it; the trainer's per-step stop check
runs over a gloo group on NCCL runs (host memory, no GPU sync). DeepSpeed's own calls are not counted:
they are not llm's to remove (its ZeRO 1-2 optimizer reads the norm for clipping, for instance)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llm.config import load_config
from llm.model.gpt import build_model, parameter_groups
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker
from tests.distributed.harness import spawn

pytestmark = pytest.mark.distributed
LLM = str(Path(__file__).resolve().parents[2] / "llm")
METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def _count_calls(found: list[str]) -> None:
    """Wraps the tensor methods that synchronise; a call made from a frame in llm/ is recorded."""
    for name in METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _original: object = original, _name: str = name,
                    **kwargs: object) -> object:  # fmt: skip
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(LLM):
                found.append(f"{frame.f_code.co_filename.removeprefix(LLM)}:{frame.f_lineno} {_name}")
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        setattr(torch.Tensor, name, counted)


def _run(rank: int, world: int, zero: int, precision: str) -> None:
    from llm.engine.build import initialize_engine
    from llm.engine.deepspeed_config import deepspeed_setup
    from llm.engine.mpu import MeshMPU
    from llm.training.lr_schedule import make_scheduler
    from llm.training.optim import clipped_optimizer
    from llm.training.steps import make_steps

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
                             "model.seq_length=16", "model.vocab_size=300", "train.micro_batch_size=2",
                             "train.global_batch_size=8", f"train.precision={precision}", "train.lr_warmup_iters=1",
                             "debug.fp8_on_cpu=true", f"deepspeed_config=configs/deepspeed/zero{zero}.json"])  # fmt: skip
    ctx = ParallelContext.build()
    ds, plan = deepspeed_setup(cfg, world, cuda=False)
    rng = RNGTracker()
    model = build_model(cfg.model, seed=1, ctx=ctx, rng=rng)
    if precision == "fp8":  # the scales stay on the device: no synchronisation either
        from llm.parallel.layers import use_fp8

        assert use_fp8(model, ctx) == []
    groups = parameter_groups(model, cfg.train.weight_decay)
    opt = clipped_optimizer(groups, cfg.train, ctx) if plan.optimizer_from == "llm" else None
    engine = initialize_engine(model, optimizer=opt, parameter_groups=groups, ds_config=ds,
                               lr_scheduler=make_scheduler(cfg.train), mpu=MeshMPU(ctx))  # fmt: skip
    steps = make_steps(engine, cfg, ctx, plan, rng)
    gen = torch.Generator().manual_seed(rank)
    batches = iter([torch.randint(0, 300, (2, 17), generator=gen) for _ in range(20)])
    steps.train(batches, None, 8)  # the first step builds optimizer state
    found: list[str] = []
    _count_calls(found)
    for _ in range(3):
        result = steps.train(batches, None, 8)
        assert result.loss > 0
    assert len(found) <= 3, f"{len(found)} synchronising calls in 3 steps: {found}"
    assert found, "the loss is read once per step (the count is of real calls)"
    assert float(result.grad_norm) > 0  # type: ignore[arg-type]  (read when logged)


@pytest.mark.parametrize("zero, precision", [(0, "fp32"), (1, "fp32"), (1, "fp8")])
def test_a_training_step_synchronises_with_the_device_at_most_once(zero: int, precision: str) -> None:
    spawn(_run, 2, zero, precision)
