"""Hugging Face export: a checkpoint of any layout -> a directory that `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load offline (safetensors; gpt2 -> GPT2LMHeadModel, llama ->
LlamaForCausalLM; the tokenizer encodes exactly as ours, see llm/export/tokenizer.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint.format import (
    CheckpointError,
    config_from_meta,
    read_meta,
    resolve_checkpoint,
)
from llm.checkpoint.merge import load_model_state
from llm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, run_tokenizer
from llm.export.tokenizer import sentencepiece_to_hf
from llm.model.hf import check_exportable, hf_config, to_hf_state_dict
from llm.progress import Progress

EXPORT_RECORD = "llm_export.json"  # what an export writes besides transformers' files


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    tokenizer: str | None = None,
    verify: bool = True,
    trust_pickles: bool = False,
    overwrite: bool = False,
) -> Path:
    """Writes the transformers directory `output`: into a temporary sibling first, renamed into place
    when complete (an interrupted export never looks like a model). An `output` that holds anything is
    refused; `overwrite` replaces an earlier export (a directory with llm_export.json) once the new one
    is complete, and nothing else (it never deletes a directory of other files)."""
    from transformers import AutoModelForCausalLM

    out = Path(output).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise CheckpointError(
                f"--output '{output}' exists and is not empty: export into a new directory, or pass --overwrite to "
                "replace an earlier export there"
            )
        if not (out / EXPORT_RECORD).is_file():
            raise CheckpointError(
                f"--output '{output}' holds files that are not an earlier export (no {EXPORT_RECORD}); --overwrite "
                "replaces only an export: choose another directory"
            )

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
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial, safe_serialization=True)
        progress.update()
        progress.close()
        _export_tokenizer(tok, partial)
        (partial / EXPORT_RECORD).write_text(
            json.dumps(
                {"checkpoint": str(checkpoint), "iteration": meta.get("iteration"), "model": cfg.model.__dict__}
            )
        )
        _replace_dir(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return Path(output)


def _replace_dir(new: Path, target: Path) -> None:
    """The directory `new` becomes `target`; the directory `target` was (empty, or an earlier export)
    is removed only after the rename."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def _export_tokenizer(tok: Any, out: Path) -> None:
    if isinstance(tok, SentencePieceTokenizer):
        sentencepiece_to_hf(tok.path).save_pretrained(out)
    elif isinstance(tok, HFTokenizer):
        tok._tok.save_pretrained(out)
    else:  # pragma: no cover - load_tokenizer returns one of the two
        raise TypeError(type(tok))
