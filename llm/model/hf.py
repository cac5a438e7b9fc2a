"""The one mapping between our parameters and Hugging Face transformers' GPT-2 and Llama.

`to_hf(state, cfg)` gives a transformers config and state dict; `from_hf(hf_state, hf_config)`
gives ours back. Export, import and the parity tests all go through these two functions.
Only the real vocabulary is exported: padded rows are dropped so that no padded id can take
probability mass in transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from llm.config import ModelConfig
from llm.errors import LLMError
from llm.parallel.qkv import join_qkv, split_qkv


class NoHFClassError(LLMError, ValueError):
    """A model setting that no transformers class reproduces; the message names it."""


def check_exportable(cfg: ModelConfig) -> None:
    """Refuses, in one line, a model that no transformers class computes exactly."""
    if cfg.is_moe:
        _check_moe_exportable(cfg)
    if cfg.parallel_block:
        preset = "llama preset (RMSNorm, SwiGLU)" if cfg.is_llama else "gpt2 preset (learned positions)"
        raise NoHFClassError(
            f"model.parallel_block has no transformers class for the {preset}: the parallel blocks there "
            "(GPT-J, GPT-NeoX, Phi, Falcon) use rotary positions with LayerNorm and a GELU MLP. Evaluate and "
            "sample with scripts/evaluate.py and scripts/generate.py instead"
        )


def moe_class(cfg: ModelConfig) -> str:
    """The transformers model type of an MoE: `mixtral` (every block MoE, no shared experts) or
    `qwen2_moe` (shared experts; dense blocks allowed)."""
    return "qwen2_moe" if cfg.moe_shared_expert_intermediate_size else "mixtral"


def _check_moe_exportable(cfg: ModelConfig) -> None:
    why = None
    if not cfg.is_llama:
        why = "the gpt2 preset's experts (GELU, biases) have no transformers class; the llama preset exports"
    elif cfg.moe_router_score_function != "softmax":
        why = "sigmoid routing has no transformers class that takes our attention (Mixtral and Qwen2-MoE route by softmax)"
    elif cfg.moe_router_enable_expert_bias:
        why = "the expert bias (moe_router_enable_expert_bias) changes which experts are chosen; Mixtral and Qwen2-MoE have none"
    elif moe_class(cfg) == "mixtral" and len(cfg.moe_layers) < cfg.num_layers:
        why = ("dense blocks (moe_layer_freq) without shared experts have no transformers class: Mixtral's blocks are "
               "all MoE and Qwen2-MoE's MoE blocks have shared experts")  # fmt: skip
    if why:
        raise NoHFClassError(f"this mixture of experts cannot be exported: {why}. Evaluate and sample with "
                             "scripts/evaluate.py and scripts/generate.py instead")  # fmt: skip


def _qkv_to_parts(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our grouped [q.. k v] rows -> (q rows, k rows, v rows) in head order."""
    q, k, v = split_qkv(w, heads=cfg.num_attention_heads, groups=cfg.kv_groups, head_dim=cfg.head_dim)
    return q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)


def _parts_to_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return join_qkv(q, k, v, heads=cfg.num_attention_heads, groups=cfg.kv_groups, head_dim=cfg.head_dim)


def hf_config(cfg: ModelConfig) -> Any:
    from transformers import GPT2Config, LlamaConfig

    check_exportable(cfg)
    vocab = int(cfg.vocab_size or 0)
    if cfg.is_moe:
        return _moe_hf_config(cfg, vocab)
    if cfg.is_llama:
        return LlamaConfig(**_llama_kwargs(cfg, vocab), intermediate_size=cfg.ffn_size, attention_bias=False,
                           mlp_bias=False)  # fmt: skip
    return GPT2Config(
        vocab_size=vocab,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=cfg.ffn_size,
        n_positions=cfg.max_positions,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=cfg.tied,
        bos_token_id=None,  # GPT-2's 50256 is not in our vocabulary; the exporter sets the tokenizer's
        eos_token_id=None,
    )


def _llama_kwargs(cfg: ModelConfig, vocab: int) -> dict[str, Any]:
    """What Llama, Mixtral and Qwen2-MoE configs share: the attention, norms, rotary and embeddings."""
    return dict(
        vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_groups, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=cfg.tied,
        hidden_act="silu",
    )  # fmt: skip


def _moe_hf_config(cfg: ModelConfig, vocab: int) -> Any:
    """Mixtral or Qwen2-MoE (moe_class). Routing is softmax, top-k, renormalised, as ours; transformers
    routes dropless (a training capacity does not apply to the exported model)."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = dict(_llama_kwargs(cfg, vocab), num_experts_per_tok=cfg.moe_router_topk,
                  router_aux_loss_coef=cfg.moe_aux_loss_coeff)  # fmt: skip
    if moe_class(cfg) == "mixtral":
        return MixtralConfig(**common, intermediate_size=cfg.moe_ffn_size, num_local_experts=int(cfg.num_experts or 0),
                             sliding_window=None)  # fmt: skip
    dense = [i for i in range(cfg.num_layers) if i not in cfg.moe_layers]
    return Qwen2MoeConfig(
        **common, intermediate_size=cfg.ffn_size, moe_intermediate_size=cfg.moe_ffn_size,
        shared_expert_intermediate_size=int(cfg.moe_shared_expert_intermediate_size or 0),
        num_experts=int(cfg.num_experts or 0),
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=dense, qkv_bias=False, use_sliding_window=False,
    )  # fmt: skip


def _moe_mlp_to_hf(s: dict[str, torch.Tensor], src: str, dst: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An MoE block's MLP: the router is transformers' `gate`, the stacked experts its fused
    `gate_up_proj` ([gate | up], as ours) and `down_proj`. Qwen2-MoE gates its shared experts by
    sigmoid(w . x): w = 0 gives 1/2, and the shared down projection is doubled to make up for it."""
    out = {dst + "gate.weight": s[src + "router.weight"], dst + "experts.gate_up_proj": s[src + "experts.fc.weight"],
           dst + "experts.down_proj": s[src + "experts.proj.weight"]}  # fmt: skip
    if cfg.moe_shared_expert_intermediate_size:
        gate, up = s[src + "shared_experts.fc.weight"].chunk(2, dim=0)
        out.update({dst + "shared_expert.gate_proj.weight": gate, dst + "shared_expert.up_proj.weight": up,
                    dst + "shared_expert.down_proj.weight": 2 * s[src + "shared_experts.proj.weight"],
                    dst + "shared_expert_gate.weight": torch.zeros(1, cfg.hidden_size)})  # fmt: skip
    return out


def _moe_mlp_from_hf(hf: dict[str, torch.Tensor], h: str, p: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `_moe_mlp_to_hf`; a Qwen2-MoE whose shared-expert gate is not zero has no
    equivalent here (nor attention biases that are not zero: `from_hf_state_dict`)."""
    out = {p + "router.weight": hf[h + "gate.weight"], p + "experts.fc.weight": hf[h + "experts.gate_up_proj"],
           p + "experts.proj.weight": hf[h + "experts.down_proj"]}  # fmt: skip
    if cfg.moe_shared_expert_intermediate_size:
        if torch.count_nonzero(hf[h + "shared_expert_gate.weight"]):
            raise NoHFClassError(
                f"{h}shared_expert_gate is not zero: llm's shared experts are not gated, so this Qwen2-MoE model "
                "cannot be imported exactly (models exported by llm have a zero gate)"
            )
        out[p + "shared_experts.fc.weight"] = torch.cat([hf[h + "shared_expert.gate_proj.weight"],
                                                         hf[h + "shared_expert.up_proj.weight"]])  # fmt: skip
        out[p + "shared_experts.proj.weight"] = hf[h + "shared_expert.down_proj.weight"] / 2
    return out


def _gpt2_layer_to_hf(s: dict[str, torch.Tensor], i: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = f"layers.{i}.", f"transformer.h.{i}."
    q, k, v = _qkv_to_parts(s[src + "attention.qkv.weight"], cfg)
    qb, kb, vb = _qkv_to_parts(s[src + "attention.qkv.bias"], cfg)
    return {
        dst + "ln_1.weight": s[src + "input_norm.weight"],
        dst + "ln_1.bias": s[src + "input_norm.bias"],
        dst + "attn.c_attn.weight": torch.cat([q, k, v]).t(),
        dst + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
        dst + "attn.c_proj.weight": s[src + "attention.proj.weight"].t(),
        dst + "attn.c_proj.bias": s[src + "attention.proj.bias"],
        dst + "ln_2.weight": s[src + "post_attention_norm.weight"],
        dst + "ln_2.bias": s[src + "post_attention_norm.bias"],
        dst + "mlp.c_fc.weight": s[src + "mlp.fc.weight"].t(),
        dst + "mlp.c_fc.bias": s[src + "mlp.fc.bias"],
        dst + "mlp.c_proj.weight": s[src + "mlp.proj.weight"].t(),
        dst + "mlp.c_proj.bias": s[src + "mlp.proj.bias"],
    }


def _llama_layer_to_hf(s: dict[str, torch.Tensor], i: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = f"layers.{i}.", f"model.layers.{i}."
    q, k, v = _qkv_to_parts(s[src + "attention.qkv.weight"], cfg)
    out = {
        dst + "input_layernorm.weight": s[src + "input_norm.weight"],
        dst + "self_attn.q_proj.weight": q,
        dst + "self_attn.k_proj.weight": k,
        dst + "self_attn.v_proj.weight": v,
        dst + "self_attn.o_proj.weight": s[src + "attention.proj.weight"],
        dst + "post_attention_layernorm.weight": s[src + "post_attention_norm.weight"],
    }
    if i in cfg.moe_layers:
        return {**out, **_moe_mlp_to_hf(s, src + "mlp.", dst + "mlp.", cfg)}
    gate, up = s[src + "mlp.fc.weight"].chunk(2, dim=0)
    return {**out, dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": s[src + "mlp.proj.weight"]}  # fmt: skip


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> transformers' (GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM or
    Qwen2MoeForCausalLM) names and layouts."""
    vocab = int(cfg.vocab_size or 0)
    embed = state["embed.weight"][:vocab]
    out: dict[str, torch.Tensor] = {}
    if cfg.is_llama:
        out["model.embed_tokens.weight"] = embed
        for i in range(cfg.num_layers):
            out.update(_llama_layer_to_hf(state, i, cfg))
        out["model.norm.weight"] = state["final_norm.weight"]
        out["lm_head.weight"] = embed if cfg.tied else state["lm_head.weight"][:vocab]
    else:
        out["transformer.wte.weight"] = embed
        out["transformer.wpe.weight"] = state["pos_embed.weight"]
        for i in range(cfg.num_layers):
            out.update(_gpt2_layer_to_hf(state, i, cfg))
        out["transformer.ln_f.weight"] = state["final_norm.weight"]
        out["transformer.ln_f.bias"] = state["final_norm.bias"]
        out["lm_head.weight"] = embed if cfg.tied else state["lm_head.weight"][:vocab]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] >= rows:
        return w
    return torch.cat([w, torch.zeros(rows - w.shape[0], *w.shape[1:], dtype=w.dtype)])


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ours (padded vocabulary rows are zero)."""
    padded = cfg.padded_vocab_size()
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        if cfg.is_llama:
            h = f"model.layers.{i}."
            out[p + "input_norm.weight"] = hf[h + "input_layernorm.weight"]
            out[p + "attention.qkv.weight"] = _parts_to_qkv(
                hf[h + "self_attn.q_proj.weight"],
                hf[h + "self_attn.k_proj.weight"],
                hf[h + "self_attn.v_proj.weight"],
                cfg,
            )
            out[p + "attention.proj.weight"] = hf[h + "self_attn.o_proj.weight"]
            out[p + "post_attention_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
            biases = [k for k in ("q", "k", "v") if torch.count_nonzero(hf.get(h + f"self_attn.{k}_proj.bias", torch.zeros(1)))]
            if biases:
                raise NoHFClassError(f"{h}self_attn has attention biases ({', '.join(biases)}): the llama preset has none, "
                                     "so this model cannot be imported exactly")  # fmt: skip
            if i in cfg.moe_layers:
                out.update(_moe_mlp_from_hf(hf, h + "mlp.", p + "mlp.", cfg))
                continue
            out[p + "mlp.fc.weight"] = torch.cat(
                [hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]
            )
            out[p + "mlp.proj.weight"] = hf[h + "mlp.down_proj.weight"]
        else:
            h = f"transformer.h.{i}."
            n = cfg.hidden_size
            w, b = hf[h + "attn.c_attn.weight"].t(), hf[h + "attn.c_attn.bias"]
            out[p + "attention.qkv.weight"] = _parts_to_qkv(w[:n], w[n : 2 * n], w[2 * n :], cfg)
            out[p + "attention.qkv.bias"] = _parts_to_qkv(b[:n], b[n : 2 * n], b[2 * n :], cfg)
            out[p + "input_norm.weight"], out[p + "input_norm.bias"] = (
                hf[h + "ln_1.weight"],
                hf[h + "ln_1.bias"],
            )
            out[p + "attention.proj.weight"] = hf[h + "attn.c_proj.weight"].t()
            out[p + "attention.proj.bias"] = hf[h + "attn.c_proj.bias"]
            out[p + "post_attention_norm.weight"] = hf[h + "ln_2.weight"]
            out[p + "post_attention_norm.bias"] = hf[h + "ln_2.bias"]
            out[p + "mlp.fc.weight"], out[p + "mlp.fc.bias"] = (
                hf[h + "mlp.c_fc.weight"].t(),
                hf[h + "mlp.c_fc.bias"],
            )
            out[p + "mlp.proj.weight"], out[p + "mlp.proj.bias"] = (
                hf[h + "mlp.c_proj.weight"].t(),
                hf[h + "mlp.c_proj.bias"],
            )
    if cfg.is_llama:
        out["embed.weight"] = _pad_rows(hf["model.embed_tokens.weight"], padded)
        out["final_norm.weight"] = hf["model.norm.weight"]
    else:
        out["embed.weight"] = _pad_rows(hf["transformer.wte.weight"], padded)
        out["pos_embed.weight"] = hf["transformer.wpe.weight"]
        out["final_norm.weight"], out["final_norm.bias"] = (
            hf["transformer.ln_f.weight"],
            hf["transformer.ln_f.bias"],
        )
    if not cfg.tied:
        out["lm_head.weight"] = _pad_rows(hf["lm_head.weight"], padded)
    return {k: v.contiguous().clone() for k, v in out.items()}
