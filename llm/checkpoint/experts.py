"""The expert shards of a mixture-of-experts checkpoint: `experts/ep_EEE_tp_TT_pp_PP.pt`, each the
stacked expert weights one expert-parallel rank holds ({plain-model name: (E / EP, ...) tensor}),
written by the first replica of that rank (expert-data-parallel index 0, tensor-parallel rank 0: the
experts are replicated over TP, so `tp` is 00 until experts are split over TP).

DeepSpeed's model-states file is written by data-parallel rank 0 alone, so it holds the experts of
expert-parallel rank 0 only; these files hold every rank's. A resume at the same layout loads this
rank's file over the module's experts (at ZeRO 1-2 DeepSpeed restores the same values from its fp32
partitions; at ZeRO 0 only this file has them), and merging for evaluation and export joins them
along the expert dimension.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm.checkpoint import writer
from llm.checkpoint.format import CheckpointError
from llm.checkpoint.pickles import load_file
from llm.model.names import canonical_name
from llm.parallel.process_groups import ParallelContext

EXPERTS_DIR = "experts"
Tensors = dict[str, torch.Tensor]


def expert_file(tag_dir: Path, *, ep: int, tp: int = 0, pp: int = 0) -> Path:
    return tag_dir / EXPERTS_DIR / f"ep_{ep:03d}_tp_{tp:02d}_pp_{pp:02d}.pt"


def _experts(module: torch.nn.Module, num_layers: int) -> dict[str, torch.nn.Parameter]:
    return {canonical_name(n, num_layers): p for n, p in module.named_parameters()
            if getattr(p, "expert_parallel", False)}  # fmt: skip


def write_expert_shard(
    module: torch.nn.Module, ctx: ParallelContext, tag_dir: Path, *, num_layers: int, durable: bool
) -> None:
    """This rank's experts, if it is the first replica of its expert-parallel rank (a dense model:
    nothing), through the checkpoint writer (`durable`: flushed to disk)."""
    experts = _experts(module, num_layers)
    if not experts or ctx.ep == 1 or ctx.dp_rank >= ctx.ep or ctx.tp_rank > 0 or ctx.cp_rank > 0:
        return  # without expert parallelism DeepSpeed's own files hold every expert
    path = expert_file(tag_dir, ep=ctx.ep_rank, pp=ctx.pp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.save({n: p.detach().cpu().clone() for n, p in experts.items()}, path, durable=durable)


@torch.no_grad()
def load_expert_shard(
    module: torch.nn.Module, ctx: ParallelContext, tag_dir: Path, *, num_layers: int, trust: bool
) -> None:
    """This rank's experts back from its expert file (a dense model or EP 1: nothing)."""
    experts = _experts(module, num_layers)
    if not experts or ctx.ep == 1:
        return
    saved = read_expert_file(expert_file(tag_dir, ep=ctx.ep_rank, pp=ctx.pp_rank), trust=trust)
    for name, p in experts.items():
        if name not in saved or saved[name].shape != p.shape:
            raise CheckpointError(
                f"expert weights '{name}' of checkpoint '{tag_dir}' do not match this model: it was written by "
                "another version or is damaged"
            )
        p.copy_(saved[name].to(p.dtype))


def read_expert_file(path: Path, *, trust: bool) -> Tensors:
    if not path.is_file():
        raise CheckpointError(f"expert weights '{path}' are missing: the checkpoint is incomplete; use an earlier one")
    return dict(load_file(path, trust=trust))


def _read_stages(tag_dir: Path, ep: int, *, trust: bool) -> Tensors:
    """Every pipeline stage's file of one expert-parallel rank, as one dict."""
    files = sorted((tag_dir / EXPERTS_DIR).glob(f"ep_{ep:03d}_tp_00_pp_*.pt"))
    if not files:
        raise CheckpointError(f"expert weights of expert-parallel rank {ep} are missing from '{tag_dir}': the "
                              "checkpoint is incomplete; use an earlier one")  # fmt: skip
    return {k: v for f in files for k, v in read_expert_file(f, trust=trust).items()}


def merge_expert_shards(tag_dir: Path, state: Tensors, *, ep: int, trust: bool) -> Tensors:
    """`state` (DeepSpeed's model file: expert-parallel rank 0's experts) with every expert weight
    replaced by all experts, joined in expert-parallel order (EP 1: `state` holds them all)."""
    if ep == 1:
        return state
    shards = [_read_stages(tag_dir, r, trust=trust) for r in range(ep)]
    out = dict(state)
    for name in shards[0]:
        out[name] = torch.cat([s[name] for s in shards])
    return out
