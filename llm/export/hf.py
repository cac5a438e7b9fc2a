"""Hugging Face export and import.

Export: a checkpoint of any layout -> a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline (safetensors; gpt2 -> GPT2LMHeadModel, llama ->
LlamaForCausalLM; the tokenizer encodes exactly as ours, see llm/export/tokenizer.py).

Import: a GPT-2 or Llama directory on disk -> an llm checkpoint to continue pretraining from. It
is written in the layout-independent form a resume at another layout uses (`universal/`: full
weights; the optimizer starts fresh), so it loads at any TP x PP x DP and ZeRO stage:
`deepspeed scripts/pretrain.py --config OUT/config.yaml checkpoint.resume=OUT/iter_0000000 ...`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from llm.checkpoint.format import (
    UNIVERSAL_FORM,
    CheckpointError,
    config_from_meta,
    read_meta,
    resolve_checkpoint,
    set_latest,
    tag_for,
    write_manifest,
    write_meta,
)
from llm.checkpoint.merge import load_model_state
from llm.checkpoint.reshard import write_universal
from llm.config import Config, ModelConfig, replace_validated
from llm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, run_tokenizer
from llm.export.tokenizer import sentencepiece_to_hf
from llm.model.hf import check_exportable, from_hf_state_dict, hf_config, to_hf_state_dict
from llm.progress import Progress


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    tokenizer: str | None = None,
    verify: bool = True,
    trust_pickles: bool = False,
) -> Path:
    from transformers import AutoModelForCausalLM

    # a model no transformers class computes is refused before any weights are read
    check_exportable(config_from_meta(read_meta(resolve_checkpoint(checkpoint))).model)
    progress = Progress(3, f"exporting {checkpoint} to {output}", unit="stages", interval=0.0)
    cfg, state, meta = load_model_state(checkpoint, verify=verify, trust_pickles=trust_pickles)
    progress.update()  # read, verified and merged
    tok = run_tokenizer(cfg.data.tokenizer, tokenizer)
    config = hf_config(cfg.model)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(state, cfg.model), strict=False)
    missing = [
        m for m in missing if "rotary" not in m and not m.endswith("attn.bias") and m != "lm_head.weight"
    ]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint '{checkpoint}' does not map onto {type(model).__name__}: {missing or unexpected}"
        )
    progress.update()  # mapped onto the transformers model
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    progress.update()
    progress.close()
    _export_tokenizer(tok, out)
    (out / "llm_export.json").write_text(
        json.dumps(
            {"checkpoint": str(checkpoint), "iteration": meta.get("iteration"), "model": cfg.model.__dict__}
        )
    )
    return out


def _export_tokenizer(tok: Any, out: Path) -> None:
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
    if kind == "llama":
        rope = (getattr(config, "rope_parameters", None) or {}).get(
            "rope_theta", getattr(config, "rope_theta", 1e4)
        )
        return ModelConfig(
            architecture="llama", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
            ffn_hidden_size=config.intermediate_size, seq_length=seq_length or config.max_position_embeddings,
            max_position_embeddings=config.max_position_embeddings, vocab_size=config.vocab_size,
            norm_eps=config.rms_norm_eps, rope_theta=float(rope), tie_embeddings=bool(config.tie_word_embeddings),
        )  # fmt: skip
    raise CheckpointError(f"model type '{kind}' is not supported: import GPT-2 or Llama models")


def import_hf(source: str | Path, output: str | Path, *, base: Config, seq_length: int | None = None) -> Path:
    """A transformers directory -> `output/iter_0000000` (+ `latest`, `config.yaml`); returns the tag dir.

    Written like every checkpoint: the universal form through the writer a layout-changing resume
    uses (full fp32 weights; no optimizer state, so AdamW starts fresh), llm_meta.json with the
    config (validated), MANIFEST, and `latest` moved last, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(source)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"'{src}' is not a transformers model directory (no config.json)")
    model_cfg = model_config_from_hf(AutoConfig.from_pretrained(src), seq_length=seq_length)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = from_hf_state_dict(hf.state_dict(), model_cfg)
    has_tokenizer = (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file()
    data = dataclasses.replace(base.data, tokenizer=str(src.resolve())) if has_tokenizer else base.data
    directory = Path(output)
    # The config trains into the import's own run directory (its checkpoints are the import's), never
    # into the base config's: `pretrain.py --config <output>/config.yaml` continues from iteration 0.
    run_dir = directory.parent if directory.name == "checkpoints" else directory
    logging_cfg = dataclasses.replace(base.logging, dir=str(run_dir))
    checkpoint_cfg = dataclasses.replace(base.checkpoint, dir=str(directory), resume="auto")
    cfg = replace_validated(base, model=model_cfg, data=data, logging=logging_cfg, checkpoint=checkpoint_cfg)
    tag_dir = directory / tag_for(0)
    shutil.rmtree(tag_dir, ignore_errors=True)
    tag_dir.mkdir(parents=True)
    write_universal(
        tag_dir, ((name, {"fp32": value}) for name, value in state.items()), {"step": 0.0}, total=len(state)
    )
    meta = {"iteration": 0, "consumed_samples": 0, "wandb_run_id": None, "config": cfg.to_dict(),
            "form": UNIVERSAL_FORM, "imported_from": str(src)}  # fmt: skip
    write_meta(tag_dir, meta)
    write_manifest(tag_dir)
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    set_latest(directory, tag_dir.name)
    return tag_dir
