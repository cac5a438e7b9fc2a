"""Parameter and FLOP counts of llm's GPT from its config alone (no model is built), and the
peak throughput of common accelerators. Used by the training metrics (TFLOP/s, MFU) and by the
layout planner (memory and step time), so both count the same model the same way."""

from __future__ import annotations

import math

from llm.config import ModelConfig

# Dense bf16 peak of common accelerators, TFLOP/s, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def block_params(m: ModelConfig, tp: int) -> int:
    """Parameters of one transformer block on one tensor-parallel rank."""
    h, f, d = m.hidden_size, m.ffn_size, m.head_dim
    qkv_rows = (m.num_attention_heads + 2 * m.kv_groups) * d
    fc_rows = 2 * f if m.is_llama else f
    sharded = qkv_rows * h + h * h + fc_rows * h + f * h
    norms = 1 if m.parallel_block and m.parallel_block_norms == 1 else 2
    if m.is_llama:
        return sharded // tp + norms * h  # RMSNorm weights
    column_biases = qkv_rows + f
    return sharded // tp + column_biases // tp + 2 * h + norms * 2 * h  # row biases + LayerNorms


def pipeline_layer_params(m: ModelConfig, tp: int, vocab: int) -> list[int]:
    """Per DeepSpeed pipeline layer: embedding, blocks, final norm, LM head (the tied head holds a
    copy of the embedding, as DeepSpeed's TiedLayerSpec does on the last stage)."""
    padded = m.make_vocab_size_divisible_by * tp * math.ceil(vocab / (m.make_vocab_size_divisible_by * tp))
    embed = padded // tp * m.hidden_size + (0 if m.is_llama else m.max_positions * m.hidden_size)
    norm = m.hidden_size * (1 if m.is_llama else 2)
    head = padded // tp * m.hidden_size
    return [embed, *([block_params(m, tp)] * m.num_layers), norm, head]


def total_params(m: ModelConfig, vocab: int) -> int:
    """Unique parameters of the whole model (tied embeddings counted once)."""
    layers = pipeline_layer_params(m, 1, vocab)
    return sum(layers) - (layers[-1] if m.tied else 0)


def model_flops_per_token(m: ModelConfig, num_params: int | None = None) -> float:
    """Training FLOPs per token of the whole model, whatever the layout: 6 x the matmul parameters
    (blocks and LM head, from the config: a rank's own parameter count would undercount by TP x PP)
    plus attention scores (12 L h S, causal counted fully, as Megatron does). `num_params` is
    used only when the vocabulary size is not known yet."""
    attention = 12.0 * m.num_layers * m.hidden_size * m.seq_length
    if m.vocab_size is None:
        return 6.0 * float(num_params or 0) + attention
    layers = pipeline_layer_params(m, 1, m.vocab_size)
    return 6.0 * (sum(layers[1 : 1 + m.num_layers]) + layers[-1]) + attention


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
