"""Hugging Face import: a GPT-2, Llama, Mixtral or Qwen2-MoE directory on disk -> an llm checkpoint to continue pretraining from.

It is written in the layout-independent form a resume at another layout uses (`universal/`: full
weights; the optimizer starts fresh), so it loads at any TP x PP x DP and ZeRO stage:
`deepspeed scripts/pretrain.py --config OUT/config.yaml checkpoint.resume=OUT/iter_0000000 ...`.
Nothing in the directory runs code (no `trust_remote_code`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from llm.checkpoint import writer
from llm.checkpoint.format import (
    UNIVERSAL_FORM,
    CheckpointError,
    checkpoint_files,
    describe_files,
    latest_tag,
    set_latest,
    tag_for,
    write_manifest,
    write_meta,
)
from llm.checkpoint.reshard import write_universal
from llm.config import Config, ModelConfig, replace_validated
from llm.model.hf import from_hf_state_dict


def model_config_from_hf(config: Any, *, seq_length: int | None = None) -> ModelConfig:
    """transformers' GPT2Config / LlamaConfig / MixtralConfig / Qwen2MoeConfig -> our ModelConfig (the
    inverse of `hf_config`)."""
    kind = config.model_type
    if kind == "gpt2":
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(
                f"GPT-2 activation '{config.activation_function}' is not supported (gelu_new only)"
            )
        return ModelConfig(
            architecture="gpt2", num_layers=config.n_layer, hidden_size=config.n_embd,
            num_attention_heads=config.n_head, ffn_hidden_size=config.n_inner or 4 * config.n_embd,
            seq_length=seq_length or config.n_positions, max_position_embeddings=config.n_positions,
            vocab_size=config.vocab_size, norm_eps=config.layer_norm_epsilon,
            tie_embeddings=bool(config.tie_word_embeddings),
        )  # fmt: skip
    if kind in ("llama", "mixtral", "qwen2_moe"):
        rope = (getattr(config, "rope_parameters", None) or {}).get(
            "rope_theta", getattr(config, "rope_theta", 1e4)
        )
        llama = dict(
            architecture="llama", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
            ffn_hidden_size=config.intermediate_size, seq_length=seq_length or config.max_position_embeddings,
            max_position_embeddings=config.max_position_embeddings, vocab_size=config.vocab_size,
            norm_eps=config.rms_norm_eps, rope_theta=float(rope), tie_embeddings=bool(config.tie_word_embeddings),
        )  # fmt: skip
        return ModelConfig(**llama, **_moe_settings_from_hf(config))
    raise CheckpointError(f"model type '{kind}' is not supported: import GPT-2, Llama, Mixtral or Qwen2-MoE models")


def _moe_settings_from_hf(config: Any) -> dict[str, Any]:
    """Mixtral / Qwen2-MoE routing and experts -> our MoE keys (a Llama: none)."""
    kind = config.model_type
    if kind == "mixtral":
        return {"num_experts": config.num_local_experts, "moe_router_topk": config.num_experts_per_tok,
                "moe_ffn_hidden_size": config.intermediate_size, "moe_aux_loss_coeff": config.router_aux_loss_coef}  # fmt: skip
    if kind != "qwen2_moe":
        return {}
    if not config.norm_topk_prob:
        raise CheckpointError("this Qwen2-MoE model does not renormalise its top-k weights (norm_topk_prob: false); "
                              "llm's routing always does, so it cannot be imported exactly")  # fmt: skip
    sparse = [int(i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0)
              for i in range(config.num_hidden_layers)]  # fmt: skip
    return {"num_experts": config.num_experts, "moe_router_topk": config.num_experts_per_tok,
            "moe_ffn_hidden_size": config.moe_intermediate_size, "moe_aux_loss_coeff": config.router_aux_loss_coef,
            "moe_shared_expert_intermediate_size": config.shared_expert_intermediate_size, "moe_layer_freq": sparse}  # fmt: skip


def import_hf(source: str | Path, output: str | Path, *, base: Config, seq_length: int | None = None) -> Path:
    """A transformers directory -> `output/iter_0000000` (+ `latest`, `config.yaml`); returns the tag dir.

    Written like every checkpoint: the universal form through the writer a layout-changing resume
    uses (full fp32 weights; no optimizer state, so AdamW starts fresh), llm_meta.json with the
    config (validated), MANIFEST, and `latest` moved last, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, directory = Path(source), Path(output)
    if latest_tag(directory) or any(directory.glob("iter_*")):
        raise CheckpointError(
            f"--output '{directory}' already holds checkpoints (an import there would become the one a resume takes): "
            "import into a new directory"
        )
    if not (src / "config.json").is_file():
        raise CheckpointError(f"'{src}' is not a transformers model directory (no config.json)")
    model_cfg = model_config_from_hf(AutoConfig.from_pretrained(src), seq_length=seq_length)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = from_hf_state_dict(hf.state_dict(), model_cfg)
    has_tokenizer = (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file()
    data = dataclasses.replace(base.data, tokenizer=str(src.resolve())) if has_tokenizer else base.data
    # The config trains into the import's own run directory (its checkpoints are the import's), never
    # into the base config's: `pretrain.py --config <output>/config.yaml` continues from iteration 0.
    run_dir = directory.parent if directory.name == "checkpoints" else directory
    logging_cfg = dataclasses.replace(base.logging, dir=str(run_dir))
    checkpoint_cfg = dataclasses.replace(base.checkpoint, dir=str(directory), resume="auto")
    cfg = replace_validated(base, model=model_cfg, data=data, logging=logging_cfg, checkpoint=checkpoint_cfg)
    tag_dir = directory / tag_for(0)
    tag_dir.mkdir(parents=True)
    write_universal(
        tag_dir, ((name, {"fp32": value}) for name, value in state.items()), {"step": 0.0}, total=len(state),
        durable=True,
    )
    meta = {"iteration": 0, "consumed_samples": 0, "wandb_run_id": None, "config": cfg.to_dict(),
            "form": UNIVERSAL_FORM, "imported_from": str(src)}  # fmt: skip
    write_meta(tag_dir, meta)
    # the weights were checksummed and flushed to disk as they were written; the rest now
    files = writer.for_manifest(writer.take_recorded(tag_dir))
    rest = [n for n in checkpoint_files(tag_dir, universal=True) if n not in files]
    files.update(describe_files(tag_dir, rest, durable=True))
    write_manifest(tag_dir, files, durable=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    set_latest(directory, tag_dir.name, durable=True)
    return tag_dir
