"""The mixture-of-experts MLP (model.num_experts): a router, the experts, optional shared experts.

    x (B, S, H) -> tokens (T, H) -> router: each token's top-k experts and their weights
      -> the token copies sorted by expert (with a capacity: each expert's lowest-weighted copies
         beyond it dropped)
      -> llm.parallel.experts.dispatch: to the expert-parallel rank that holds each expert
      -> the local experts (grouped GEMMs on GPU and in FP8, a loop on CPU) -> combine: back where
         they came from
      -> the weighted sum of each token's copies (+ the shared experts, which see every token)

Routing (Megatron's and Mixtral's convention): scores are softmax (or sigmoid) of the router
logits in fp32; the top-k by score (plus the expert bias of auxiliary-loss-free balancing, for the
choice only) are chosen; their weights are the chosen scores normalised to sum to 1.

The auxiliary losses (load balancing, z-loss) join the training objective but not the reported LM
loss: `attach_aux_loss` passes the block's output through unchanged and, in backward, gives the
auxiliary loss the gradient it would have had as a term of the loss (as Megatron's
MoEAuxLossAutoScaler does). So they need no path of their own through a pipeline.

Expert parameters hold this rank's E / EP experts stacked along dim 0 and carry `expert_parallel =
True` and `full_shape`; the seam (llm/engine/experts.py) registers them with DeepSpeed, which reduces
their gradients over the expert-data-parallel group only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig
from llm.model import activations
from llm.parallel.experts import (
    ExpertLinear,
    combine,
    dispatch,
    grouped_linear,
    sum_over_data,
    sum_over_sequence,
)
from llm.parallel.layers import linear, sequence_parallel_param
from llm.parallel.mappings import gather_sequence_shards, scatter_to_sequence
from llm.parallel.process_groups import ParallelContext


@dataclass
class MoEState:
    """Shared by a model's MoE layers. `aux_grad_scale`: the gradient factor of the auxiliary losses,
    set by the training loop to what DeepSpeed multiplies the LM loss by in backward (1 / gradient
    accumulation). `recomputing`: activation checkpointing is re-running a forward (statistics are
    then not counted again)."""

    aux_grad_scale: float = 1.0
    recomputing: bool = False


def checkpoint_contexts(
    contexts: tuple[AbstractContextManager[None], AbstractContextManager[None]], state: MoEState
) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """`torch.utils.checkpoint`'s (forward, recompute) contexts, the recomputation marked in `state`."""

    @contextmanager
    def recompute() -> Iterator[None]:
        state.recomputing = True
        try:
            with contexts[1]:
                yield
        finally:
            state.recomputing = False

    return contexts[0], recompute()


class _AttachAuxLoss(torch.autograd.Function):
    """Forward: `out` unchanged. Backward: `out`'s gradient passes, and `aux` (a scalar) receives
    `scale`, as if `aux` were a term of the loss. No collective."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    return _AttachAuxLoss.apply(out, aux, scale)  # type: ignore[no-any-return]


class _SumIntoTokens(torch.autograd.Function):
    """out[token_of[i]] += rows[i] (index_add) with a backward that keeps only the index: autograd's
    own formula for index_add keeps `rows` too (for its shape), k copies' worth of activations per
    token that backward never reads. The same values and gradients (grad.index_select)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, token_of: torch.Tensor, tokens: int) -> torch.Tensor:
        ctx.save_for_backward(token_of)
        return rows.new_zeros(tokens, rows.shape[1]).index_add_(0, token_of, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (token_of,) = ctx.saved_tensors
        return grad.index_select(0, token_of), None, None


def sum_into_tokens(rows: torch.Tensor, token_of: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N, H) weighted token copies -> (tokens, H): each token's copies summed (zero for a token whose
    copies were all dropped)."""
    return _SumIntoTokens.apply(rows, token_of, tokens)  # type: ignore[no-any-return]


# ---- routing: pure functions of the router logits (the tests check them against the formulas) ----
def route(
    logits: torch.Tensor, *, topk: int, score: str, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (T, E) fp32 -> scores (T, E), chosen experts (T, k), their weights (T, k), summing to 1."""
    scores = torch.softmax(logits, dim=-1) if score == "softmax" else torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias
    chosen = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, chosen)
    return scores, chosen, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)


def load_balancing_loss(
    scores: torch.Tensor, chosen: torch.Tensor, *, num_experts: int, sequences: int = 1,
    hits: torch.Tensor | None = None, share: int = 1,
) -> torch.Tensor:  # fmt: skip
    """Switch Transformer's loss, E x sum_e f_e P_e (1 at a perfectly even load): f_e the fraction of
    token copies routed to e, P_e the mean (normalised) score of e. With `sequences` > 1 (DeepSeek-V3's
    sequence-wise loss) f and P are taken within each sequence and the losses averaged.

    When this rank holds 1 / `share` of every sequence's tokens (tensor and context parallelism), `hits`
    (sequences, E) are the copies routed to each expert counted over all of them, and the result is
    this rank's part: the parts of the `share` ranks add up to the loss of the whole."""
    t, k = chosen.shape
    local = t // sequences  # this rank's tokens per sequence
    probs = scores / scores.sum(dim=-1, keepdim=True)  # softmax: unchanged; sigmoid: normalised
    if hits is None:
        hits = torch.zeros_like(scores).scatter_(1, chosen, 1.0).view(sequences, local, -1).sum(dim=1)
    total = local * share  # tokens per sequence over every rank
    f = hits / (total * k)  # (sequences, E)
    p = probs.view(sequences, local, -1).sum(dim=1) / total
    return num_experts * (f * p).sum(dim=-1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean squared log-sum-exp of the logits (under tensor and context
    parallelism the caller divides this rank's mean by TP x CP: the parts add up to the micro-batch's mean)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def sort_by_expert(
    chosen: torch.Tensor, weights: torch.Tensor, *, num_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) choices -> the flat indices (into T x k) of the kept copies, sorted by expert, and how
    many each expert keeps (E,). With a capacity each expert keeps its `capacity` highest-weighted
    copies (Megatron's "probs" drop policy) and drops the rest."""
    flat = chosen.flatten()
    counts = torch.bincount(flat, minlength=num_experts)
    if capacity is None:
        return torch.argsort(flat, stable=True), counts
    by_weight = torch.argsort(weights.flatten(), descending=True, stable=True)
    order = by_weight[torch.argsort(flat[by_weight], stable=True)]  # by expert, then weight descending
    starts = torch.cumsum(counts, 0) - counts
    place = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return order[place < capacity], counts.clamp(max=capacity)


def expert_capacity(tokens: int, cfg: ModelConfig) -> int | None:
    """Token copies each expert takes per micro-batch: capacity factor x an even share."""
    if cfg.moe_expert_capacity_factor is None:
        return None
    k, e = cfg.moe_router_topk, int(cfg.num_experts or 1)
    return math.ceil(cfg.moe_expert_capacity_factor * tokens * k / e)


# ---- modules ---------------------------------------------------------------------------------------
USE_GROUPED_MM = True  # False: the per-expert loop on GPU too (tests and benchmarks compare the two)


def _same(p: torch.Tensor) -> torch.Tensor:
    return p


class Experts(nn.Module):
    """This rank's experts (model.num_experts / EP of them), each an MLP as the dense one: fc (H ->
    F, or 2F as [gate | up] for SwiGLU), the activation, proj (F -> H)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        e, n, ffn, h = int(cfg.num_experts or 1), int(cfg.num_experts or 1) // ctx.ep, cfg.moe_ffn_size, cfg.hidden_size
        self.swiglu = cfg.is_llama
        self.fc = ExpertLinear(n, e, h, 2 * ffn if self.swiglu else ffn, bias=not cfg.is_llama)
        self.proj = ExpertLinear(n, e, ffn, h, bias=not cfg.is_llama)
        self.activation = activations.pair("swiglu" if self.swiglu else "gelu")

    def forward(
        self, rows: torch.Tensor, counts: torch.Tensor, *, param: Callable[[torch.Tensor], torch.Tensor] = _same
    ) -> torch.Tensor:
        """rows (M, H) grouped by local expert, counts (n,) -> (M, H). `param`: how each weight enters
        (summed gradients under tensor parallelism, MoE._param)."""
        fc_w, proj_w = param(self.fc.weight), param(self.proj.weight)
        fc_b = None if self.fc.bias is None else param(self.fc.bias)
        proj_b = None if self.proj.bias is None else param(self.proj.bias)
        fp8 = self.fc.fp8  # use_fp8 switches both layers
        f = self.activation[0]
        inside = self.activation if activations.RECOMPUTE_ACTIVATION else None  # the projection applies it
        if fp8 or (USE_GROUPED_MM and rows.is_cuda and rows.dtype == torch.bfloat16):
            # every local expert in one grouped GEMM
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # where each expert's rows end
            expert = None if fc_b is None else _expert_of_rows(counts)  # the biases' rows (GELU experts)
            h = grouped_linear(rows, fc_w, offsets, fp8=fp8)
            h = h if fc_b is None else h + fc_b[expert]
            y = grouped_linear(h if inside else f(h), proj_w, offsets, fp8=fp8, activation=inside)
            return y if proj_b is None else y + proj_b[expert]
        outs = []  # CPU (and fp32): a loop over the local experts
        for e, x in enumerate(rows.split(counts.tolist())):
            h = F.linear(x, fc_w[e], None if fc_b is None else fc_b[e])
            y = linear(h, proj_w[e], None, None, inside) if inside else F.linear(f(h), proj_w[e])
            outs.append(y if proj_b is None else y + proj_b[e])
        return torch.cat(outs)


def _expert_of_rows(counts: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)  # (M,)


class Router(nn.Module):
    """weight (E, H); with auxiliary-loss-free balancing, `expert_bias` (E,) fp32, a buffer moved by
    `update_expert_bias` after every step (saved with the model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = int(cfg.num_experts or 1)
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size))
        self.expert_bias: torch.Tensor | None
        self.register_buffer(
            "expert_bias", torch.zeros(e, dtype=torch.float32) if cfg.moe_router_enable_expert_bias else None
        )


@dataclass
class MoEStats:
    """What one MoE layer saw since the statistics were last read (detached tensors on its device:
    no host synchronisation until they are read)."""

    load_balancing: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    z_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    tokens: torch.Tensor | None = None  # (E,) token copies routed to each expert, before any drop
    dropped: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    micro_batches: int = 0


class MoE(nn.Module):
    """The MLP of an MoE block. `forward(x)` (B, S, H) -> (B, S, H)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, state: MoEState, shared: nn.Module | None) -> None:
        super().__init__()
        self.cfg, self.ctx, self.state = cfg, ctx, state
        self.num_experts = int(cfg.num_experts or 1)
        self.router = Router(cfg)
        self.experts = Experts(cfg, ctx)
        self.shared_experts = shared
        self.stats = MoEStats()
        self.step_tokens: torch.Tensor | None = None  # (E,) this step's routed copies (expert bias update)

    def forward(self, x: torch.Tensor, *, gathered: bool = False, reduce: bool = True) -> torch.Tensor:
        """x (B, S, H) -> (B, S, H); under sequence parallelism (B, S / tp, H) -> the same. `gathered`,
        `reduce`: the dense MLP's, for parallel blocks, which take an MoE at TP 1 only (both change
        nothing there); the output is always complete, biases included.

        Under tensor parallelism the experts are replicated over the TP group and each TP rank routes
        its own share of the tokens (its sequence shard; without sequence parallelism it takes its
        slice of the replicated input and the outputs are gathered after): no collective inside an
        expert, and 1 / TP of the tokens in each rank's all-to-all."""
        split = self.ctx.tp > 1 and not self.cfg.sequence_parallel
        local = scatter_to_sequence(x, self.ctx) if split else x  # (B, S / tp, H) under TP
        routed = self._routed(local)
        out = gather_sequence_shards(routed, self.ctx) if split else routed
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def _param(self, p: torch.Tensor) -> torch.Tensor:
        """A weight replicated over TP but used on each rank's own tokens: gradients summed over TP."""
        return sequence_parallel_param(p, self.ctx, self.ctx.tp > 1)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)  # (T, H): this rank's tokens
        logits = F.linear(tokens.float(), self._param(self.router.weight).float())  # (T, E) fp32
        cfg, k = self.cfg, self.cfg.moe_router_topk
        scores, chosen, weights = route(logits, topk=k, score=cfg.moe_router_score_function,
                                        bias=self.router.expert_bias)  # fmt: skip
        order, counts = sort_by_expert(chosen, weights, num_experts=self.num_experts,
                                       capacity=expert_capacity(b * s, cfg))  # fmt: skip
        token_of = order // k  # the token each kept copy belongs to
        rows, local_counts, back = dispatch(tokens[token_of], counts, self.ctx)
        out_rows = combine(self.experts(rows, local_counts, param=self._param), back, self.ctx)  # (N, H)
        out_rows = out_rows * weights.flatten()[order].unsqueeze(1).to(out_rows.dtype)
        out = sum_into_tokens(out_rows, token_of, b * s).view(b, s, h)
        return self._auxiliary(out, logits, scores, chosen, sequences=b, kept=order.numel())

    def _auxiliary(
        self, out: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor, *,
        sequences: int, kept: int,
    ) -> torch.Tensor:  # fmt: skip
        """Attaches the auxiliary losses to the output and records the statistics (training only).
        Under tensor and context parallelism each rank's losses are its part of the micro-batch's (the
        expert counts summed over TP x CP, its own scores over all tokens): the parts add up to the
        whole."""
        if not self.training:
            return out
        cfg, share = self.cfg, self.ctx.tp * self.ctx.cp
        seq = cfg.moe_router_load_balancing_type == "seq_aux_loss"
        groups = sequences if seq else 1
        hits = torch.zeros_like(scores).scatter_(1, chosen, 1.0).view(groups, -1, self.num_experts).sum(1)
        balance = load_balancing_loss(scores, chosen, num_experts=self.num_experts, sequences=groups,
                                      hits=sum_over_sequence(hits, self.ctx), share=share)  # fmt: skip
        z = z_loss(logits) / share
        terms = [c * t for c, t, on in [(cfg.moe_aux_loss_coeff, balance, cfg.moe_router_load_balancing_type != "none"),
                                        (cfg.moe_z_loss_coeff, z, True)] if on and c > 0]  # fmt: skip
        if terms and torch.is_grad_enabled():
            out = attach_aux_loss(out, sum(terms), self.state.aux_grad_scale)  # type: ignore[arg-type]
        if not self.state.recomputing:
            self._record(balance.detach(), z.detach(), chosen, dropped=chosen.numel() - kept)
        return out

    def _record(self, balance: torch.Tensor, z: torch.Tensor, chosen: torch.Tensor, *, dropped: int) -> None:
        hits = torch.bincount(chosen.flatten(), minlength=self.num_experts)
        st = self.stats
        st.load_balancing = st.load_balancing.to(balance.device) + balance
        st.z_loss = st.z_loss.to(z.device) + z
        st.tokens = hits if st.tokens is None else st.tokens + hits
        st.dropped = st.dropped.to(hits.device) + dropped
        st.micro_batches += 1
        self.step_tokens = hits if self.step_tokens is None else self.step_tokens + hits


    def output_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y  # the experts' biases are inside the output already


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(block number, layer) of every MoE layer of this rank's part of the model."""
    return [(int(getattr(parent, "layer_number", -1)), m) for parent in model.modules()
            for m in parent.children() if isinstance(m, MoE)]  # fmt: skip


@torch.no_grad()
def update_expert_bias(model: nn.Module, ctx: ParallelContext) -> None:
    """After an optimizer step, auxiliary-loss-free balancing (DeepSeek-V3): each expert's bias moves
    by model.moe_router_bias_update_rate towards an even load, from the step's load over every
    data-parallel rank (so the bias stays the same on all of them)."""
    layers = [m for _, m in moe_layers(model) if m.router.expert_bias is not None and m.step_tokens is not None]
    if not layers:
        return
    loads = sum_over_data(torch.stack([m.step_tokens.float() for m in layers]), ctx)  # type: ignore[union-attr]
    for layer, load in zip(layers, loads):  # one all-reduce for every layer
        bias = layer.router.expert_bias
        assert bias is not None
        bias += layer.cfg.moe_router_bias_update_rate * torch.sign(load.mean() - load)
        layer.step_tokens = None


def moe_metrics(model: nn.Module, ctx: ParallelContext) -> dict[str, float]:
    """The MoE statistics since the last call, per layer and in total, then reset; every rank calls it
    (the load is summed over the ranks that route other tokens, the losses averaged over data-parallel
    ranks, and with pipeline parallelism every stage's layers are gathered). Per layer `moe/layer{i}/`
    `load_balancing_loss` and `z_loss` (without their coefficients), `load_imbalance` (the busiest
    expert's share / the mean share), `dropped_fraction` (of the token copies) and `expert_bias_range`
    (max - min); in total `moe_load_balancing_loss` and `moe_z_loss` (means over layers),
    `moe_load_imbalance` (the largest), `moe_dropped_fraction` and `moe_expert_bias_range` (the largest)."""
    layers = moe_layers(model)
    rows = []
    for _, layer in layers:
        st, micro = layer.stats, max(layer.stats.micro_batches, 1)
        tokens = st.tokens.cpu().double() if st.tokens is not None else torch.zeros(layer.num_experts).double()
        head = [float(st.load_balancing) / micro, float(st.z_loss) / micro, float(st.dropped)]
        rows.append(torch.cat([torch.tensor(head, dtype=torch.float64), tokens]))
        layer.stats = MoEStats()
    per_layer: dict[int, dict[str, float]] = {}
    summed = sum_over_data(torch.stack(rows), ctx) if rows else torch.zeros(0)  # (L, 3 + E): one all-reduce
    for (number, layer), row in zip(layers, summed):
        load = row[3:]
        copies = float(load.sum())
        entry = {"load_balancing_loss": float(row[0]) / ctx.dp, "z_loss": float(row[1]) / ctx.dp,
                  "load_imbalance": float(load.max() / load.mean()) if copies else 0.0,
                  "dropped": float(row[2]), "copies": copies}  # fmt: skip
        if layer.router.expert_bias is not None:
            entry["expert_bias_range"] = float(layer.router.expert_bias.max() - layer.router.expert_bias.min())
        per_layer[number] = entry
    if ctx.pp > 1:  # every stage's layers
        per_layer = {n: v for part in ctx.all_gather_object(per_layer) for n, v in part.items()}
    if not per_layer:
        return {}
    out: dict[str, float] = {}
    for number, v in sorted(per_layer.items()):
        shown = {k: x for k, x in v.items() if k not in ("dropped", "copies")}
        shown["dropped_fraction"] = v["dropped"] / v["copies"] if v["copies"] else 0.0
        out.update({f"moe/layer{number}/{k}": x for k, x in shown.items()})
    values = list(per_layer.values())
    copies = sum(v["copies"] for v in values)
    out["moe_load_balancing_loss"] = sum(v["load_balancing_loss"] for v in values) / len(values)
    out["moe_z_loss"] = sum(v["z_loss"] for v in values) / len(values)
    out["moe_load_imbalance"] = max(v["load_imbalance"] for v in values)
    out["moe_dropped_fraction"] = sum(v["dropped"] for v in values) / copies if copies else 0.0
    ranges = [v["expert_bias_range"] for v in values if "expert_bias_range" in v]
    if ranges:
        out["moe_expert_bias_range"] = max(ranges)
    return out
