"""DiLoCo's outer loop over a DeepSpeed engine (Douillard et al. 2023; Streaming DiLoCo, 2025).

Each island trains on its own (DeepSpeed inside the island); every `inner_steps` steps each rank
takes the outer gradient of the fp32 master weights it updates (start-of-round weights minus
current ones), averages it with the same rank of every other island (llm.parallel.exchange:
fp32, bf16/fp16, or int8/int4 with error feedback) and applies it with the outer optimizer, SGD
with (Nesterov) momentum:

    m = mu m + g;  step = g + mu m (Nesterov) or m;  outer = start - outer_lr x step

which becomes the weights and the next round's start. Streaming: the rank's weights are split
into `fragments` contiguous ranges synchronized at staggered steps (fragment f after steps
t = f H / F mod H); with `delay` tau the exchange runs in the background for tau inner steps and
the result is then mixed with the weights trained meanwhile: w = mixing w + (1 - mixing) outer.
At the end of training every fragment is synchronized once more, so all islands end with the
outer weights.

Which weights: ZeRO 1/2 and bf16 keep fp32 masters partitioned over the island's data-parallel
ranks (each rank exchanges its partition, found through llm.engine.internals; DeepSpeed then
refreshes the model copies); fp32 at ZeRO 0 updates the module's parameters, which every DP rank holds whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llm.config import DilocoConfig
from llm.engine.internals import partitioned_fp32_masters
from llm.model.names import canonical_name
from llm.parallel.exchange import Exchange, check_block, start_exchange
from llm.parallel.process_groups import ParallelContext


@dataclass
class Masters:
    """The fp32 weights this rank's outer step updates, as pieces of named parameters (a whole
    parameter, or the part of it in this rank's ZeRO partition), and how the model copies learn of
    a change."""

    pieces: list[tuple[str, torch.Tensor]]  # (canonical parameter name, 1-D fp32 view)
    push: Callable[[], None]
    replicated_over_dp: bool  # every DP rank holds all of them (count them once)


def master_weights(engine: Any, num_layers: int) -> Masters:
    opt, module = engine.optimizer, engine.module
    names = {id(p): canonical_name(n, num_layers) for n, p in module.named_parameters()}
    partitioned = partitioned_fp32_masters(engine)
    if partitioned is not None:  # ZeRO 1/2, and bf16 at ZeRO 0: fp32 partitions over the DP ranks
        fragments, push = partitioned
        return Masters([(names[id(p)], view) for p, view in fragments], push, replicated_over_dp=False)
    held = {id(p) for g in getattr(opt, "param_groups", []) for p in g["params"]}
    pieces = [(names[id(p)], p.data.view(-1)) for p in module.parameters() if id(p) in held]
    if not pieces or any(t.dtype != torch.float32 for _, t in pieces):
        raise ValueError(f"DiLoCo cannot find fp32 master weights in {type(opt).__name__}")
    return Masters(pieces, lambda: None, replicated_over_dp=True)


def fragment_of(name: str, num_layers: int, fragments: int) -> int:
    """Streaming DiLoCo's fragments are runs of layers: block k goes to fragment k F / L, the
    embeddings to the first, the final norm and output layer to the last. Layout-independent."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) * fragments // num_layers
    return 0 if "embed" in name else fragments - 1


class Pieces:
    """Several 1-D tensors read and written as one vector in which each starts at a multiple of
    `align` (zero padding between): quantization blocks never straddle two parameters."""

    def __init__(self, tensors: list[torch.Tensor], align: int) -> None:
        self.tensors = tensors
        self.offsets = [0]
        for t in tensors:
            self.offsets.append(self.offsets[-1] + -(-t.numel() // align) * align)

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def read(self) -> torch.Tensor:
        out = torch.zeros(
            self.numel, dtype=torch.float32, device=self.tensors[0].device if self.tensors else "cpu"
        )
        for t, at in zip(self.tensors, self.offsets):
            out[at : at + t.numel()] = t
        return out

    def write(self, values: torch.Tensor) -> None:
        for t, at in zip(self.tensors, self.offsets):
            t.copy_(values[at : at + t.numel()])


@dataclass
class Fragment:
    view: Pieces  # this rank's master weights of the fragment
    offset: int  # synchronized after iterations t with t % inner_steps == offset
    outer: torch.Tensor  # the start-of-round (outer) weights
    momentum: torch.Tensor
    residual: torch.Tensor | None  # what compression lost, added to the next outer gradient
    pending: Exchange | None = None
    result: torch.Tensor | None = None  # a finished exchange's mean (after a checkpoint waited for it)
    apply_at: int = 0
    wire_bytes: int = 0  # of the exchange in flight (or landed last)


@dataclass
class RoundStats:
    outer_grad_sq: float = 0.0
    wire_bytes: int = 0
    wait_seconds: float = 0.0
    synced: list[int] = field(default_factory=list)


class DiLoCo:
    def __init__(self, cfg: DilocoConfig, ctx: ParallelContext, engine: Any, *, num_layers: int) -> None:
        check_block(cfg.exchange, cfg.quant_block_size)
        self.cfg, self.ctx = cfg, ctx
        self.masters = master_weights(engine, num_layers)
        align = cfg.quant_block_size if cfg.exchange in ("int8", "int4") else 1
        lossy = cfg.exchange != "fp32" and cfg.error_feedback
        self.fragments = []
        for i in range(cfg.fragments):
            view = Pieces(
                [t for name, t in self.masters.pieces if fragment_of(name, num_layers, cfg.fragments) == i],
                align,
            )
            outer = view.read()
            self.fragments.append(Fragment(
                view, offset=i * cfg.inner_steps // cfg.fragments, outer=outer, momentum=torch.zeros_like(outer),
                residual=torch.zeros_like(outer) if lossy else None,
            ))  # fmt: skip
        self.numel = sum(f.view.numel for f in self.fragments)
        self.bytes_total = 0

    # ------------------------------------------------------------------------------ the loop
    def after_step(self, iteration: int, *, final: bool) -> dict[str, Any] | None:
        """Called by every rank after inner step `iteration` (1-based): lands the exchanges due now and
        starts those whose round ends now; `final` (the run's last step) ends every fragment's round
        at once, so every island ends with the outer weights. Returns the metrics when anything landed."""
        cfg, stats = self.cfg, RoundStats()
        for f in self.fragments:
            if (f.pending is not None or f.result is not None) and (f.apply_at <= iteration or final):
                self._land(f, stats, mix=True)
        for f in self.fragments:
            if final or iteration % cfg.inner_steps == f.offset:
                now = final or cfg.delay == 0
                self._start(f, iteration, stats, background=not now)
                if now:
                    self._land(f, stats, mix=False)
        if not stats.synced:
            return None
        self.masters.push()
        return self._metrics(stats)

    def _start(self, f: Fragment, iteration: int, stats: RoundStats, *, background: bool) -> None:
        delta = f.outer - f.view.read()  # (n_f,) the outer gradient
        if f.residual is not None:
            delta += f.residual
        f.pending = start_exchange(self.ctx, delta, self.cfg.exchange, block=self.cfg.quant_block_size,
                                   background=background)  # fmt: skip
        if f.residual is not None:
            f.residual = delta - f.pending.sent()
        f.apply_at = iteration + self.cfg.delay
        f.wire_bytes = f.pending.wire_bytes
        self.bytes_total += f.wire_bytes

    def _land(self, f: Fragment, stats: RoundStats, *, mix: bool) -> None:
        if f.pending is not None:
            g = f.pending.wait()
            stats.wait_seconds += f.pending.wait_seconds
            f.pending = None
        else:
            assert f.result is not None
            g = f.result
        f.result = None
        cfg = self.cfg
        f.momentum.mul_(cfg.outer_momentum).add_(g)
        step = g + cfg.outer_momentum * f.momentum if cfg.nesterov else f.momentum
        f.outer = f.outer - cfg.outer_lr * step
        new = f.outer
        if mix and cfg.delay > 0:
            new = cfg.mixing * f.view.read() + (1 - cfg.mixing) * f.outer
        f.view.write(new)
        stats.outer_grad_sq += float(g.double().pow(2).sum())
        stats.wire_bytes += f.wire_bytes
        stats.synced.append(self.fragments.index(f))

    def _metrics(self, stats: RoundStats) -> dict[str, Any]:
        ctx = self.ctx
        counted = 0.0 if self.masters.replicated_over_dp and ctx.dp_rank > 0 else stats.outer_grad_sq
        sq, wire = ctx.sum_over_world([counted, float(stats.wire_bytes)])
        return {
            "diloco_outer_grad_norm": math.sqrt(sq / ctx.islands),  # islands agree: one island's norm
            "diloco_bytes_sent": stats.wire_bytes,  # by this rank (ring algorithms)
            "diloco_bytes_sent_all_ranks": int(wire),
            "diloco_bytes_sent_total": self.bytes_total,
            "diloco_wait_seconds": stats.wait_seconds,
            "diloco_fragments": stats.synced,
        }

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly; an exchange in flight is waited for and kept as its result."""
        for f in self.fragments:
            if f.pending is not None:
                f.result, f.pending = f.pending.wait(), None
        return {
            "config": {"exchange": self.cfg.exchange, "fragments": self.cfg.fragments, "numel": self.numel},
            "bytes_total": self.bytes_total,
            "fragments": [
                {"outer": f.outer, "momentum": f.momentum, "residual": f.residual, "result": f.result,
                 "apply_at": f.apply_at, "wire_bytes": f.wire_bytes}
                for f in self.fragments
            ],
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.fragments:  # a rollback: exchanges in flight finish first (every island takes part)
            if f.pending is not None:
                f.pending.wait()
                f.pending = None
        saved = state["config"]
        ours = {"exchange": self.cfg.exchange, "fragments": self.cfg.fragments, "numel": self.numel}
        if saved["numel"] != ours["numel"] or saved["fragments"] != ours["fragments"]:
            raise ValueError(f"the checkpoint's DiLoCo state ({saved}) does not fit this run ({ours})")
        self.bytes_total = int(state["bytes_total"])
        for f, s in zip(self.fragments, state["fragments"]):
            f.outer, f.momentum, f.result = s["outer"], s["momentum"], s["result"]
            f.apply_at, f.wire_bytes = int(s["apply_at"]), int(s["wire_bytes"])
            if f.residual is not None:
                f.residual = s["residual"] if s["residual"] is not None else torch.zeros_like(f.outer)
