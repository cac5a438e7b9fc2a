"""Memory per device of one parallel layout: weights, gradients, optimizer state, activations.

Everything is counted for the largest pipeline stage of one rank, from the model config alone (no
model is built, so 70B configs plan in milliseconds):

- Parameters per stage: the exact per-layer counts of llm's GPT (tensor-parallel shards and
  replicated norms/biases; of an MoE, the experts of one expert-parallel rank), cut into stages by
  DeepSpeed's own partition functions.
- Weights, gradients, optimizer: bytes per local parameter as DeepSpeed holds them for each ZeRO
  stage and precision (`STATE_BYTES`); ZeRO shards over the data-parallel size D (routed experts
  over D / EP, the ranks that hold the same experts).
- Activations: the tensors autograd keeps per layer in llm's blocks (see `layer_activation_bytes`),
  times the micro-batches in flight (1, or min(P - stage, m) under DeepSpeed's 1F1B schedule); with
  activation checkpointing only each block's input plus one block being recomputed.
- The loss: logits and the cross-entropy's float32 softmax and gradients on the last stage.
Flash/memory-efficient attention (SDPA) is assumed: no S x S score matrix is kept.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from llm.config import ModelConfig
from llm.engine.partition import deepspeed_partitioners
from llm.model.flops import expert_layer_params, pipeline_layer_params

GB = 2**30


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch_size: int
    activation_checkpointing: bool = False
    sequence_parallel: bool = False
    ep: int = 1  # expert parallelism (a mixture of experts): divides DP
    cp: int = 1  # context parallelism: each rank holds S / CP tokens of every sample

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def describe(self) -> str:
        extras = [
            x for x, on in (("SP", self.sequence_parallel), ("AC", self.activation_checkpointing)) if on
        ]
        ep = f" EP{self.ep}" if self.ep > 1 else ""
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        return f"TP{self.tp}{cp} PP{self.pp} DP{self.dp}{ep} Z{self.zero} mb{self.micro_batch_size}" + (
            " " + "+".join(extras) if extras else ""
        )


@dataclass(frozen=True)
class ZeroBuffers:
    """The DeepSpeed ZeRO knobs that allocate buffers (DeepSpeed's defaults)."""

    reduce_bucket_size: int = 500_000_000
    contiguous_gradients: bool = True
    overlap_comm: bool | None = None  # None: DeepSpeed's default, on for ZeRO 3 only
    prefetch_bucket_size: int = 50_000_000

    @classmethod
    def from_json(cls, zero: dict) -> ZeroBuffers:
        return cls(
            reduce_bucket_size=int(zero.get("reduce_bucket_size", cls.reduce_bucket_size)),
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
            overlap_comm=zero.get("overlap_comm"),
            prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket_size)),
        )

    def nbytes(self, *, zero: int, precision: str, params: int, touched_only: bool) -> float:
        """ZeRO 1/2: the gradient reduction bucket(s) of `reduce_bucket_size` elements (two with
        overlap_comm); ZeRO 3: the bucket plus the parameter prefetch bucket. `touched_only` counts
        only pages that are written, as a CPU's resident memory does: torch.empty pages that are
        never written take no RAM, and measured fp32 runs at ZeRO 1/2 show no bucket beyond the
        gradients already counted; on a GPU the whole allocation counts."""
        if zero == 0 or (touched_only and zero < 3):
            return 0.0
        grad_bytes = 4 if precision == "fp32" or zero == 1 else 2
        overlap = self.overlap_comm if self.overlap_comm is not None else zero == 3
        bucket = self.reduce_bucket_size if (self.contiguous_gradients or zero == 3) else 0
        if zero < 3:
            return bucket * grad_bytes * (2 if overlap else 1)
        weight_bytes = 4 if precision == "fp32" else 2
        return bucket * grad_bytes + self.prefetch_bucket_size * weight_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    stage: int  # the pipeline stage this estimate is for (the largest)
    params: int  # parameters held by one rank of that stage
    weights: float  # bytes
    gradients: float
    optimizer: float
    activations: float  # with the loss's logits and softmax on the last stage
    buffers: float = 0.0  # ZeRO communication buckets

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def async_save_host_bytes(self) -> float:
        """Host memory a background save (checkpoint.async_save) holds while it writes: the rank's
        share of the checkpoint, its weights (which data-parallel rank 0 writes) and optimizer state."""
        return self.weights + self.optimizer


# Bytes per local parameter held by DeepSpeed, as (replicated, sharded over D) for weights,
# gradients and optimizer state. fp32 (measured on CPU, benchmarks/plan_memory.py): ZeRO 0 keeps
# weights, gradients and AdamW's two moments; ZeRO 1-3 also an fp32 master copy of the partition.
# bf16 (from DeepSpeed's code; not measured here, no GPU): ZeRO 0 runs FP16_UnfusedOptimizer (bf16
# gradients, and fp32 copies of them made in its step: 6 bytes at the step's peak; fp32 master and
# moments); ZeRO 1-3 keep bf16 working copies and an fp32 gradient partition next to the fp32 master
# and moments (DeepSpeedZeroOptimizer). With data_types.grad_accum_dtype fp32 at ZeRO 1 (and in bf16
# pipelines) DeepSpeed runs BF16_Optimizer instead, whose fp32 gradient buffer is whole on every rank:
# (6, 0) for gradients there, 4 - 4/D bytes per parameter more than this table's ZeRO 1 row.
STATE_BYTES: dict[tuple[str, int], dict[str, tuple[float, float]]] = {
    ("fp32", 0): {"weights": (4, 0), "gradients": (4, 0), "optimizer": (8, 0)},
    ("fp32", 1): {"weights": (4, 0), "gradients": (4, 0), "optimizer": (0, 12)},
    ("fp32", 2): {"weights": (4, 0), "gradients": (0, 4), "optimizer": (0, 12)},
    ("fp32", 3): {"weights": (0, 4), "gradients": (0, 4), "optimizer": (0, 12)},
    ("bf16", 0): {"weights": (2, 0), "gradients": (6, 0), "optimizer": (12, 0)},
    ("bf16", 1): {"weights": (2, 0), "gradients": (2, 4), "optimizer": (0, 12)},
    ("bf16", 2): {"weights": (2, 0), "gradients": (0, 6), "optimizer": (0, 12)},
    ("bf16", 3): {"weights": (0, 2), "gradients": (0, 6), "optimizer": (0, 12)},
}


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2  # bf16, and fp8 (bf16 but for the linear layers' saved copies)


# ----------------------------------------------------------------------------------- parameters


@functools.cache
def _bounds(weights: tuple[int, ...], parts: int, uniform: bool) -> tuple[int, ...]:
    ds = deepspeed_partitioners()
    if uniform:
        return tuple(ds.partition_uniform(num_items=len(weights), num_parts=parts))
    return tuple(int(x) for x in ds.partition_balanced(weights=list(weights), num_parts=parts))


def stage_bounds(m: ModelConfig, layout: Layout, vocab: int, method: str) -> list[int]:
    """Layer index bounds of each pipeline stage, computed by DeepSpeed's partitioners."""
    counts = pipeline_layer_params(m, layout.tp, vocab, ep=layout.ep)
    if layout.pp == 1:
        return [0, len(counts)]
    if method == "uniform":
        return list(_bounds(tuple(counts), layout.pp, True))
    if method.startswith("type:"):
        return list(_bounds(tuple([0] + [1] * m.num_layers + [0, 0]), layout.pp, False))
    return list(_bounds(tuple(counts), layout.pp, False))


# ---------------------------------------------------------------------------------- activations


def layer_activation_bytes(m: ModelConfig, layout: Layout, precision: str, seq_length: int) -> float:
    """Bytes autograd keeps for one block and one micro-batch on one TP rank: exact at TP 1 in fp32,
    bf16 and fp8 but for a few bytes per token (tests/unit/test_planner.py counts them with
    saved-tensor hooks).

    Per token, with a = activation bytes (4 in fp32, 2 in bf16 and fp8), t = TP size, h, F, d, nq, g
    from the config, and lin(n) = what a linear layer keeps of an n-wide input (a n bytes; in fp8 its
    float8 copy, n bytes):
      norms: LayerNorm keeps its input, mean and rstd (a h + 2 a); llm's RMSNorm an fp32 copy of its
        input, the fp32 normalized value and rstd (8 h + 4). Under sequence parallelism these are 1/t.
        The column-parallel layer after each keeps lin(h) of its input, whole on every TP rank
        (replicated, or gathered from the sequence shards).
      attention (sharded): the qkv output ((nq + 2 g) d), with rotary the rotated q and k, SDPA's
        output and its float32 log-sum-exp per head; in fp8 the output projection keeps a float8
        copy of SDPA's output besides (nq d).
      MLP (sharded): fc's output (GELU F; SwiGLU [gate | up], 2 F), which both the activation and
        the projection recompute from in backward (llm.model.activations; in fp8 the projection casts
        the recomputed activation again at forward's scale).
      dropout masks: one byte per element of the residual stream, twice, when dropout > 0.
    In fp8 each linear layer also keeps two float32 scales per micro-batch (its weight is cast again
    in backward, llm.parallel.fp8).
    """
    a, t, h, f, d = _act_bytes(precision), layout.tp, m.hidden_size, m.ffn_size, m.head_dim
    nq, g = m.num_attention_heads, m.kv_groups
    fp8, residual = precision == "fp8", (t if layout.sequence_parallel else 1)

    def lin(n: float) -> float:
        return n if fp8 else a * n

    def weights(*shapes: tuple[float, float]) -> float:  # the scales of each linear layer
        return 8.0 * len(shapes) if fp8 else 0.0

    norm = 8 * h + 4 if m.is_llama else a * h + 2 * a
    attention = a * ((nq + 2 * g) * d + nq * d) + 4 * nq + (nq * d if fp8 else 0)
    if m.is_llama:
        attention += a * (nq * d + g * d)  # the rotated q and k
    masks = 2 * h if m.dropout > 0 else 0
    tokens = layout.micro_batch_size * seq_length
    block = tokens * ((2 * norm + masks) / residual + lin(h) + attention / t)
    block += weights(((nq + 2 * g) * d, h), (h, nq * d))
    width = 2 * f if m.is_llama else f  # fc's output: [gate | up] for SwiGLU
    # fc's output, which the activation keeps (SwiGLU [gate | up] only) and the projection recomputes the
    # activation from (llm.model.activations; in fp8 its float8 copy, llm.parallel.fp8)
    mlp = tokens * (lin(h) + a * width / t) + weights((width, h), (h, f))
    if m.is_moe:  # the larger of a dense block's MLP and an MoE block's
        mlp = max(mlp if len(m.moe_layers) < m.num_layers else 0.0, _moe_bytes(m, layout, precision, tokens))
    return block + mlp


def _moe_bytes(m: ModelConfig, layout: Layout, precision: str, tokens: int) -> float:
    """An MoE block's MLP with its input (counted with saved-tensor hooks, as above), per token: the
    router's float32 copy of its input (4 h; in fp32 the norm's output itself), its float32 logits
    and scores (2 x 4 E); the choices, their weights and the sort's indices (28 k + a k + 12); the k
    copies sent to the experts (fc's input) and the experts' outputs, which their weighting keeps
    (2 k a h; the weighted copies' sum into the tokens keeps only its index); each copy's expert MLP:
    fc's output (SwiGLU 2 F_e, GELU F_e, in a bytes), which the activation keeps and the projection
    recomputes the activation from, as in the dense MLP; the shared experts as a dense MLP, whose input
    lin(h) is the norm's output whole on every TP rank. TP ranks route their share of the tokens, so
    all but that input is divided by TP. In fp8 (row-wise scales, llm.parallel.fp8.fp8_grouped_linear)
    fc keeps its input's float8 copy (h bytes), each of the two layers a float32 scale per copy (and
    GELU experts each copy's expert for their biases); the weights are cast again in backward, so
    only their scales are kept."""
    a, t, h, k = _act_bytes(precision), layout.tp, m.hidden_size, m.moe_router_topk
    s, per_mlp = m.moe_shared_expert_intermediate_size or 0, (2 if m.is_llama else 1)
    lin = 1 if precision == "fp8" else a  # what a linear layer keeps of each input value
    routed = 8 * int(m.num_experts or 0) + 28 * k + a * k + 12 + a * (2 * k * h + k * per_mlp * m.moe_ffn_size)
    if precision == "fp8":  # fc's input in float8; two row scales and GELU experts' expert index per copy
        routed -= k * ((a - 1) * h - 8 - (0 if m.is_llama else 8))
    shared = a * (2 if m.is_llama else 1) * s  # as the dense MLP
    if precision == "fp32":  # the router's "copy" is the norm's output itself, which the shared experts keep too
        whole = 4 * h
    else:
        whole, routed = (lin * h if s else 0), routed + 4 * h
    weights = 16.0 if s and precision == "fp8" else 0.0  # the shared experts' two layers' scales
    if precision != "fp32":
        weights += 4 * int(m.num_experts or 0) * h  # the router's float32 copy of its weight
    if precision == "fp8":  # each local expert's two weight scales and where its rows end
        weights += 12 * int(m.num_experts or 0) // layout.ep
    return tokens * (whole + (routed + shared) / t) + weights


def loss_bytes(m: ModelConfig, layout: Layout, precision: str, vocab: int) -> float:
    """The last stage's loss peak: logits (a bytes), the float32 softmax kept for backward, and
    the float32 gradient of the logits with its a-byte copy at the start of backward."""
    a = _act_bytes(precision)
    padded_local = (
        m.make_vocab_size_divisible_by * math.ceil(vocab / m.make_vocab_size_divisible_by) / layout.tp
    )
    tokens = layout.micro_batch_size * m.seq_length // layout.cp  # this rank's tokens under CP
    upcast = 4 if a == 2 else 0  # logits.float() is a copy only from bf16
    return tokens * padded_local * (a + upcast + 4 + 4 + a)


def activation_bytes(
    m: ModelConfig, layout: Layout, precision: str, *, layers: int, in_flight: int, loss: float
) -> float:
    """Activations of `layers` blocks for `in_flight` micro-batches plus the stage output (the final
    norm's input, or what the pipeline keeps to send), at their peak together with `loss`: without
    checkpointing everything is alive when the loss's backward starts; with it only the block
    inputs, and the loss's tensors are gone before the first block is recomputed."""
    a = _act_bytes(precision)
    tokens = layout.micro_batch_size * m.seq_length // layout.cp  # this rank's tokens under CP
    per_layer = layer_activation_bytes(m, layout, precision, m.seq_length // layout.cp)
    block_input = tokens * m.hidden_size * a / (layout.tp if layout.sequence_parallel else 1)
    if layout.activation_checkpointing:
        kept = in_flight * layers * block_input + max(per_layer if layers else 0.0, loss)
    else:
        kept = in_flight * layers * per_layer + loss
    return kept + in_flight * block_input


# ---------------------------------------------------------------------------------------- total


def estimate_memory(
    m: ModelConfig,
    layout: Layout,
    *,
    precision: str,
    vocab: int,
    global_batch_size: int,
    partition_method: str = "parameters",
    zero_buffers: ZeroBuffers = ZeroBuffers(),
    touched_only: bool = False,
) -> MemoryEstimate:
    """The peak memory of the most loaded rank (the largest of the pipeline stages).
    `touched_only`: count memory as a CPU's resident set does (see `ZeroBuffers.nbytes`)."""
    bounds = stage_bounds(m, layout, vocab, partition_method)
    counts = pipeline_layer_params(m, layout.tp, vocab, ep=layout.ep)
    experts = expert_layer_params(m, ep=layout.ep)
    micro_batches = global_batch_size // (layout.micro_batch_size * layout.dp)
    state = STATE_BYTES[("bf16" if precision == "fp8" else precision, layout.zero)]  # fp8: the bf16 engine
    best: MemoryEstimate | None = None
    for stage in range(layout.pp):
        lo, hi = bounds[stage], bounds[stage + 1]
        params = sum(counts[lo:hi])
        if m.tied and lo == 0 and hi == len(counts):
            params -= counts[-1]  # one stage holds both ends: the tied head is the embedding itself
        blocks = sum(1 for i in range(lo, hi) if 1 <= i <= m.num_layers)
        in_flight = 1 if layout.pp == 1 else max(1, min(layout.pp - stage, micro_batches))
        routed = sum(experts[lo:hi])  # partitioned over the expert-data-parallel ranks, DP / EP
        zero_ranks = layout.dp * layout.cp  # ZeRO shards dense parameters over DP x CP
        per = {k: (params - routed) * (rep + shard / zero_ranks) + routed * (rep + shard * layout.ep / layout.dp)
               for k, (rep, shard) in state.items()}  # fmt: skip
        loss = loss_bytes(m, layout, precision, vocab) if hi == len(counts) else 0.0
        est = MemoryEstimate(
            stage=stage,
            params=params,
            weights=per["weights"],
            gradients=per["gradients"],
            optimizer=per["optimizer"],
            activations=activation_bytes(m, layout, precision, layers=blocks, in_flight=in_flight, loss=loss),
            buffers=zero_buffers.nbytes(
                zero=layout.zero, precision=precision, params=params, touched_only=touched_only
            ),
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best
