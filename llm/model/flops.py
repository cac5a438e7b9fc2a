"""Parameter and FLOP counts of llm's GPT from its config alone (no model is built), and the
peak throughput of common accelerators. Used by the training metrics (TFLOP/s, MFU) and by the
layout planner (memory and step time), so both count the same model the same way."""

from __future__ import annotations

import math

from llm.config import ModelConfig

# Dense bf16 peak of common accelerators, TFLOP/s, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _mlp_params(m: ModelConfig, f: int, tp: int) -> int:
    """One MLP of hidden size f on one tensor-parallel rank: fc, proj and (gpt2) their biases."""
    fc_rows = 2 * f if m.is_llama else f
    sharded = fc_rows * m.hidden_size + f * m.hidden_size
    return sharded // tp if m.is_llama else sharded // tp + fc_rows // tp + m.hidden_size


def _moe_params(m: ModelConfig, tp: int, *, experts: int) -> int:
    """An MoE block's MLP with `experts` routed experts present: the router, the experts (replicated
    over TP) and the shared experts (split as a dense MLP)."""
    shared = m.moe_shared_expert_intermediate_size
    router = int(m.num_experts or 0) * m.hidden_size
    return router + experts * _mlp_params(m, m.moe_ffn_size, 1) + (_mlp_params(m, shared, tp) if shared else 0)


def block_params(m: ModelConfig, tp: int, *, layer: int = 0, ep: int = 1, active: bool = False) -> int:
    """Parameters of block `layer` on one tensor-parallel rank. An MoE block counts the experts one
    expert-parallel rank of `ep` holds, or with `active` those one token uses (top-k of them)."""
    h, d = m.hidden_size, m.head_dim
    qkv_rows = (m.num_attention_heads + 2 * m.kv_groups) * d
    attention = (qkv_rows * h + h * h) // tp + (0 if m.is_llama else qkv_rows // tp + h)
    if layer in m.moe_layers:
        experts = m.moe_router_topk if active else int(m.num_experts or 0) // ep
        mlp = _moe_params(m, tp, experts=experts)
    else:
        mlp = _mlp_params(m, m.ffn_size, tp)
    norms = 1 if m.parallel_block and m.parallel_block_norms == 1 else 2
    return attention + mlp + norms * h * (1 if m.is_llama else 2)  # RMSNorm weights, LayerNorm weights and biases


def pipeline_layer_params(
    m: ModelConfig, tp: int, vocab: int, *, ep: int = 1, active: bool = False
) -> list[int]:
    """Per DeepSpeed pipeline layer: embedding, blocks, final norm, LM head (the tied head holds a
    copy of the embedding, as DeepSpeed's TiedLayerSpec does on the last stage)."""
    padded = m.make_vocab_size_divisible_by * tp * math.ceil(vocab / (m.make_vocab_size_divisible_by * tp))
    embed = padded // tp * m.hidden_size + (0 if m.is_llama else m.max_positions * m.hidden_size)
    norm = m.hidden_size * (1 if m.is_llama else 2)
    head = padded // tp * m.hidden_size
    blocks = [block_params(m, tp, layer=i, ep=ep, active=active) for i in range(m.num_layers)]
    return [embed, *blocks, norm, head]


def expert_layer_params(m: ModelConfig, *, ep: int = 1) -> list[int]:
    """Per pipeline layer (as `pipeline_layer_params`), the routed-expert parameters one
    expert-parallel rank of `ep` holds: ZeRO partitions them over DP / EP ranks, not DP."""
    per_expert = _mlp_params(m, m.moe_ffn_size, 1) if m.is_moe else 0
    blocks = [int(m.num_experts or 0) // ep * per_expert if i in m.moe_layers else 0 for i in range(m.num_layers)]
    return [0, *blocks, 0, 0]


def total_params(m: ModelConfig, vocab: int) -> int:
    """Unique parameters of the whole model (tied embeddings counted once; every expert)."""
    layers = pipeline_layer_params(m, 1, vocab)
    return sum(layers) - (layers[-1] if m.tied else 0)


def active_params(m: ModelConfig, vocab: int) -> int:
    """The parameters one token uses: a dense model's all; an MoE's top-k experts, shared experts and the
    dense parts (router included)."""
    layers = pipeline_layer_params(m, 1, vocab, active=True)
    return sum(layers) - (layers[-1] if m.tied else 0)


def model_flops_per_token(m: ModelConfig, num_params: int | None = None) -> float:
    """Training FLOPs per token of the whole model, whatever the layout: 6 x the matmul parameters a
    token uses (blocks, with an MoE's top-k experts only, and the LM head, from the config: a rank's
    own parameter count would undercount by TP x PP) plus attention scores (12 L h S, causal counted
    fully, as Megatron does). `num_params` is used only when the vocabulary size is not known yet."""
    attention = 12.0 * m.num_layers * m.hidden_size * m.seq_length
    if m.vocab_size is None:
        return 6.0 * float(num_params or 0) + attention
    layers = pipeline_layer_params(m, 1, m.vocab_size, active=True)
    return 6.0 * (sum(layers[1 : 1 + m.num_layers]) + layers[-1]) + attention


def fp8_flops_per_token(m: ModelConfig) -> float:
    """The part of `model_flops_per_token` that train.precision: fp8 multiplies in float8: the blocks'
    linear layers, all three GEMMs of each (6 per weight), the routed experts two of three (4 per
    weight: their weight gradient runs in bf16, llm.parallel.fp8). The LM head, the router, attention
    scores, norms and biases stay in bf16."""
    h = m.hidden_size
    attention = (m.num_attention_heads + 2 * m.kv_groups) * m.head_dim * h + h * h  # QKV and the output projection

    def mlp(f: int) -> int:
        return (3 if m.is_llama else 2) * f * h

    total = 0.0
    for layer in range(m.num_layers):
        total += 6.0 * attention
        if layer in m.moe_layers:
            shared = m.moe_shared_expert_intermediate_size
            total += 4.0 * m.moe_router_topk * mlp(m.moe_ffn_size) + (6.0 * mlp(shared) if shared else 0.0)
        else:
            total += 6.0 * mlp(m.ffn_size)
    return total


def gpu_peak_tflops() -> float | None:
    """The dense bf16 peak of this process's GPU (None on CPU or an unknown device)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
