"""Hugging Face export and import.

Export: a checkpoint of any layout -> a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline (safetensors; gpt2 -> GPT2LMHeadModel, llama ->
LlamaForCausalLM; the tokenizer encodes exactly as ours, see llm/export/tokenizer.py).

Import: a GPT-2 or Llama directory on disk -> an llm checkpoint to continue pretraining from. It
is written in the layout-independent form a resume at another layout uses (`universal/`: full
weights, zero AdamW moments, step 0), so it loads at any TP x PP x DP and ZeRO stage:
`deepspeed scripts/pretrain.py --config OUT/config.yaml checkpoint.resume=OUT/iter_0000000 ...`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from llm.config import Config, ModelConfig
from llm.model.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from llm.training.checkpoint import META, CheckpointError, load_model_state, tag_for, write_manifest
from llm.training.reshard import MOMENTS, UNIVERSAL_DIR


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, tokenizer: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    from llm.eval.loading import tokenizer_for

    cfg, state, meta = load_model_state(checkpoint)
    tok = tokenizer_for(cfg, tokenizer)
    config = hf_config(cfg.model)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(state, cfg.model), strict=False)
    missing = [m for m in missing if "rotary" not in m and not m.endswith("attn.bias") and m != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{checkpoint}' does not map onto {type(model).__name__}: {missing or unexpected}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    _export_tokenizer(tok, out)
    (out / "llm_export.json").write_text(
        json.dumps({"checkpoint": str(checkpoint), "iteration": meta.get("iteration"), "model": cfg.model.__dict__})
    )
    return out


def _export_tokenizer(tok: Any, out: Path) -> None:
    from llm.data.tokenizer import HFTokenizer, SentencePieceTokenizer
    from llm.export.tokenizer import sentencepiece_to_hf

    if isinstance(tok, SentencePieceTokenizer):
        sentencepiece_to_hf(tok.path).save_pretrained(out)
    elif isinstance(tok, HFTokenizer):
        tok._tok.save_pretrained(out)
    else:  # pragma: no cover - load_tokenizer returns one of the two
        raise TypeError(type(tok))


def model_config_from_hf(config: Any, *, seq_length: int | None = None) -> ModelConfig:
    """transformers' GPT2Config / LlamaConfig -> our ModelConfig (the inverse of `hf_config`)."""
    kind = config.model_type
    if kind == "gpt2":
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"GPT-2 activation '{config.activation_function}' is not supported (gelu_new only)")
        return ModelConfig(
            architecture="gpt2", num_layers=config.n_layer, hidden_size=config.n_embd,
            num_attention_heads=config.n_head, ffn_hidden_size=config.n_inner or 4 * config.n_embd,
            seq_length=seq_length or config.n_positions, max_position_embeddings=config.n_positions,
            vocab_size=config.vocab_size, norm_eps=config.layer_norm_epsilon,
            tie_embeddings=bool(config.tie_word_embeddings),
        )  # fmt: skip
    if kind == "llama":
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 1e4))
        return ModelConfig(
            architecture="llama", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
            ffn_hidden_size=config.intermediate_size, seq_length=seq_length or config.max_position_embeddings,
            max_position_embeddings=config.max_position_embeddings, vocab_size=config.vocab_size,
            norm_eps=config.rms_norm_eps, rope_theta=float(rope), tie_embeddings=bool(config.tie_word_embeddings),
        )  # fmt: skip
    raise CheckpointError(f"model type '{kind}' is not supported: import GPT-2 or Llama models")


def import_hf(source: str | Path, output: str | Path, *, base: Config, seq_length: int | None = None) -> Path:
    """A transformers directory -> `output/iter_0000000` (+ `latest`, `config.yaml`); returns the tag dir."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(source)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"'{src}' is not a transformers model directory (no config.json)")
    model_cfg = model_config_from_hf(AutoConfig.from_pretrained(src), seq_length=seq_length)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = from_hf_state_dict(hf.state_dict(), model_cfg)
    base.model = model_cfg
    if (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file():
        base.data.tokenizer = str(src.resolve())
    tag_dir = Path(output) / tag_for(0)
    universal = tag_dir / UNIVERSAL_DIR
    shutil.rmtree(tag_dir, ignore_errors=True)
    universal.mkdir(parents=True)
    for name, value in state.items():
        full = value.float().contiguous()
        torch.save({"fp32": full, **{k: torch.zeros_like(full) for k in MOMENTS}}, universal / f"{name}.pt")
    torch.save({"step": 0.0, "lr_scheduler": None, "global_steps": 0, "global_samples": 0}, universal / "state.pt")
    meta = {"iteration": 0, "consumed_samples": 0, "wandb_run_id": None, "config": base.to_dict(),
            "zero_stage": -1, "tensor_parallel": 1, "pipeline_parallel": 1, "world_size": 0,
            "imported_from": str(src)}  # fmt: skip  (layout matches no run: always loaded through universal/)
    (tag_dir / META).write_text(json.dumps(meta, indent=1))
    write_manifest(tag_dir)
    (Path(output) / "latest").write_text(tag_dir.name)
    (Path(output) / "config.yaml").write_text(yaml.safe_dump(base.to_dict(), sort_keys=False))
    return tag_dir
