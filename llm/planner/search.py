"""Candidate layouts for a model on a cluster, their memory, bubble, FLOPs and step time, and a pick.

The step-time model is deliberately simple, for ranking layouts rather than promising numbers:

  compute = model FLOPs per step (x 4/3 with activation checkpointing: one more forward)
            / (world x peak FLOP/s x achievable MFU)
  + tensor-parallel all-reduces (4 per block per micro-batch over the activations, fwd + bwd)
    at NVLink speed inside a node, network speed across nodes
  + expert parallelism's all-to-alls (an MoE: 4 per MoE block per micro-batch, k copies of each
    token, (EP-1)/EP of them leaving the rank)
  + data-parallel gradient reduction (ring: 2 (D-1)/D x gradient bytes, routed experts over D/EP
    ranks; ZeRO 3 adds a parameter all-gather per forward and backward) at network speed across nodes
  divided by (1 - bubble), bubble = (P - 1) / (m + P - 1) for P stages and m micro-batches.

The pick is the fastest layout whose memory fits `usable_fraction` of the device (the rest is
left to the CUDA context, NCCL buffers and allocator fragmentation); near-ties go to less model
parallelism, then to less memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from llm.config import Config, ConfigError, fp8_layout_problem, replace_validated
from llm.model.flops import (
    expert_layer_params,
    fp8_flops_per_token,
    model_flops_per_token,
    pipeline_layer_params,
)
from llm.planner.memory import GB, Layout, MemoryEstimate, ZeroBuffers, estimate_memory


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float = 80.0
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100 SXM)
    intra_node_gbps: float = 300.0  # GB/s per GPU inside a node (NVLink)
    inter_node_gbps: float = 40.0  # GB/s per GPU across nodes (e.g. 400 Gb/s InfiniBand per GPU)
    mfu: float = 0.45  # achievable fraction of peak for the matmuls
    # train.precision: fp8: how much faster the float8 GEMMs run than bf16 in a training step, casts
    # and scales included (2x on paper). Assumed from torchtitan's published +25-30% tokens/s at 8B with
    # every linear in float8 (about 90% of the FLOPs); benchmarks/gpu_check.sh measures ours.
    fp8_gemm_speedup: float = 1.3
    usable_fraction: float = 0.9

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    fits: bool
    bubble: float
    step_flops: float  # model FLOPs per step (6 N T + attention), without recomputation
    step_time: float  # seconds, estimated

    def to_dict(self) -> dict[str, object]:
        lay, mem = self.layout, self.memory
        return {
            "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "cp": lay.cp, "zero": lay.zero, "micro_batch_size": lay.micro_batch_size,
            "activation_checkpointing": lay.activation_checkpointing, "sequence_parallel": lay.sequence_parallel,
            "params_per_gpu": mem.params, "weights_gb": mem.weights / GB, "gradients_gb": mem.gradients / GB,
            "optimizer_gb": mem.optimizer / GB, "activations_gb": mem.activations / GB, "buffers_gb": mem.buffers / GB,
            "memory_gb": mem.total / GB, "fits": self.fits, "bubble": self.bubble,
            "step_tflops": self.step_flops / 1e12, "step_time_s": self.step_time,
        }  # fmt: skip


def step_flops(cfg: Config, vocab: int) -> float:
    """Model FLOPs of one optimizer step (the same count as the training metrics' MFU)."""
    model = dataclasses.replace(cfg.model, vocab_size=vocab)
    return cfg.train.global_batch_size * cfg.model.seq_length * model_flops_per_token(model)


def _step_time(
    cfg: Config, layout: Layout, cluster: Cluster, *, flops: float, bubble: float, act_bytes: int, vocab: int,
    fp8: bool = False,
) -> float:
    m = cfg.model
    compute = flops * (4 / 3 if layout.activation_checkpointing else 1.0)
    compute /= layout.world_size * cluster.peak_tflops * 1e12 * cluster.mfu
    if fp8:  # the share of the FLOPs in float8 GEMMs runs fp8_gemm_speedup times faster
        share = fp8_flops_per_token(m) / model_flops_per_token(dataclasses.replace(m, vocab_size=vocab))
        compute *= 1.0 - share + share / cluster.fp8_gemm_speedup
    micro = cfg.train.global_batch_size // (layout.micro_batch_size * layout.dp)
    tp_bw = (cluster.intra_node_gbps if layout.tp <= cluster.gpus_per_node else cluster.inter_node_gbps) * 1e9
    tp_bytes = 4 * m.num_layers / layout.pp * micro * layout.micro_batch_size * m.seq_length * m.hidden_size
    tp_time = 0.0 if layout.tp == 1 else tp_bytes * act_bytes * 2 * (layout.tp - 1) / layout.tp / tp_bw
    routed = sum(expert_layer_params(m, ep=layout.ep)) / layout.pp
    params = sum(pipeline_layer_params(m, layout.tp, vocab, ep=layout.ep)) / layout.pp - routed
    dp_inside = layout.tp * layout.dp <= cluster.gpus_per_node
    dp_bw = (cluster.intra_node_gbps if dp_inside else cluster.inter_node_gbps) * 1e9
    edp = layout.dp // layout.ep  # routed experts are reduced over the ranks holding the same ones
    grad_bytes = params * act_bytes * 2 * (layout.dp - 1) / layout.dp + routed * act_bytes * 2 * (edp - 1) / edp
    if layout.zero == 3:
        grad_bytes *= 1.5  # + all-gather of parameters in forward and backward
    dp_time = 0.0 if layout.dp == 1 else grad_bytes / dp_bw
    exchanges = _all_to_all_time(cfg, layout, cluster, micro, act_bytes) + _cp_time(cfg, layout, cluster, micro, act_bytes)
    return (compute + tp_time + exchanges) / (1.0 - bubble) + dp_time


def _cp_time(cfg: Config, layout: Layout, cluster: Cluster, micro: int, act_bytes: int) -> float:
    """Context parallelism: per layer and micro-batch about 8 exchanges (forward and backward) of this
    rank's S / CP tokens x hidden, (CP - 1) / CP of them leaving the rank (Ulysses' all-to-alls; the
    ring's K/V blocks are of the same order); inside a node when TP x CP GPUs fit in one."""
    if layout.cp == 1:
        return 0.0
    m = cfg.model
    inside = layout.tp * layout.cp <= cluster.gpus_per_node
    bw = (cluster.intra_node_gbps if inside else cluster.inter_node_gbps) * 1e9
    tokens = micro * layout.micro_batch_size * m.seq_length / layout.cp
    return 8 * m.num_layers / layout.pp * tokens * m.hidden_size * act_bytes * (layout.cp - 1) / layout.cp / bw


def _all_to_all_time(cfg: Config, layout: Layout, cluster: Cluster, micro: int, act_bytes: int) -> float:
    """Expert parallelism: per MoE block and micro-batch, each TP rank's share of the tokens goes to the
    experts and back, in forward and again in backward: 4 exchanges of k x tokens / TP x h x bytes, of
    which (EP - 1) / EP leave the rank; inside a node when TP x EP GPUs fit in one."""
    m = cfg.model
    if layout.ep == 1:
        return 0.0
    inside = layout.tp * layout.ep <= cluster.gpus_per_node
    bw = (cluster.intra_node_gbps if inside else cluster.inter_node_gbps) * 1e9
    tokens = micro * layout.micro_batch_size * m.seq_length / layout.tp
    layers = len(m.moe_layers) / layout.pp
    return 4 * layers * m.moe_router_topk * tokens * m.hidden_size * act_bytes * (layout.ep - 1) / layout.ep / bw


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _valid_tp(cfg: Config, tp: int, pp: int, cp: int = 1) -> bool:
    parallel = dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )
    try:
        replace_validated(
            cfg, parallel=parallel, model=dataclasses.replace(cfg.model, sequence_parallel=False)
        )
    except ConfigError:
        return False
    return True


def candidate_layouts(cfg: Config, cluster: Cluster, *, precision: str = "bf16") -> list[Layout]:
    """Every layout llm can run on this cluster at the config's global batch size."""
    world, gbs, out = cluster.world_size, cfg.train.global_batch_size, []
    for tp in (t for t in _divisors(cluster.gpus_per_node) if world % t == 0):
        for pp in (p for p in _divisors(world // tp) if p <= cfg.model.num_layers):
            for cp in (c for c in _divisors(world // (tp * pp)) if c == 1 or cfg.model.seq_length % (2 * c) == 0):
                if _valid_tp(cfg, tp, pp, cp):
                    out += _layouts(cfg, tp, pp, cp, world // (tp * pp * cp), gbs, precision)
    return out


def _layouts(cfg: Config, tp: int, pp: int, cp: int, dp: int, gbs: int, precision: str) -> list[Layout]:
    out = []
    for mb in (b for b in (1, 2, 4, 8, 16, 32) if gbs % (b * dp) == 0):
        if precision == "fp8" and fp8_layout_problem(cfg.model, tp=tp, cp=cp, micro_batch_size=mb):
            continue  # what the config check refuses in fp8
        for zero in range(4):
            # bf16 pipelines and bf16 mixtures of experts run at ZeRO 1 or more (config check), also at
            # one data-parallel rank
            needs_zero = precision != "fp32" and (pp > 1 or cfg.model.is_moe)
            if (pp > 1 and zero > 1) or (tp > 1 and zero == 3) or (dp * cp == 1 and zero > int(needs_zero)):
                continue
            if needs_zero and zero == 0:
                continue
            if cfg.model.is_moe and (zero == 3 or (zero == 0 and precision != "fp32")):
                continue  # what a mixture of experts cannot run at (validation refuses it)
            for ac in (False, True):
                for sp in (False, True) if tp > 1 and cfg.model.seq_length % tp == 0 else (False,):
                    out += [Layout(tp, pp, dp, zero, mb, ac, sp, ep, cp) for ep in _expert_sizes(cfg, dp)]
    return out


def _expert_sizes(cfg: Config, dp: int) -> list[int]:
    """The expert-parallel sizes a layout can take: divisors of DP that divide the experts."""
    experts = cfg.model.num_experts
    if experts is None:
        return [1]
    return [e for e in _divisors(dp) if experts % e == 0]


def shipped_zero_buffers(stage: int) -> ZeroBuffers:
    """The ZeRO buffers of configs/deepspeed/zero{stage}.json, the file a recommendation names: DeepSpeed's
    bucket sizes, with overlap_comm at ZeRO 2 and 3 (the reduction overlaps backward, in a second
    bucket at ZeRO 2). tests/unit/test_planner.py checks the files say so."""
    return ZeroBuffers(overlap_comm=True if stage >= 2 else None)  # None: DeepSpeed's default (off at ZeRO 0 and 1)


def evaluate_layout(
    cfg: Config, layout: Layout, cluster: Cluster, *, precision: str, vocab: int
) -> Candidate:
    mem = estimate_memory(
        cfg.model, layout, precision=precision, vocab=vocab, global_batch_size=cfg.train.global_batch_size,
        partition_method=cfg.parallel.pipeline_partition_method, zero_buffers=shipped_zero_buffers(layout.zero),
    )  # fmt: skip
    micro = cfg.train.global_batch_size // (layout.micro_batch_size * layout.dp)
    bubble = (layout.pp - 1) / (micro + layout.pp - 1)
    flops = step_flops(cfg, vocab)
    act = 4 if precision == "fp32" else 2
    fits = mem.total <= cluster.usable_fraction * cluster.gpu_memory_gb * GB
    time = _step_time(cfg, layout, cluster, flops=flops, bubble=bubble, act_bytes=act, vocab=vocab,
                      fp8=precision == "fp8")  # fmt: skip
    return Candidate(layout, mem, fits, bubble, flops, time)


def plan(cfg: Config, cluster: Cluster, *, precision: str, vocab: int) -> list[Candidate]:
    """All candidates, fitting ones first, each group fastest first (the first is the pick); at equal
    estimated time (1% steps) the one with less model parallelism, then less memory."""
    cands = [
        evaluate_layout(cfg, lay, cluster, precision=precision, vocab=vocab)
        for lay in candidate_layouts(cfg, cluster, precision=precision)
    ]
    return sorted(
        cands,
        key=lambda c: (
            not c.fits,
            round(math.log(c.step_time) / math.log(1.01)),
            c.layout.tp * c.layout.pp * c.layout.cp,
            c.layout.ep,
            c.memory.total,
        ),
    )
