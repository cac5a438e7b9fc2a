"""Hugging Face export from a TP2 x PP2 checkpoint, and import back, with real transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_OVERRIDES, launch_cmd, run, script, train_losses

pytestmark = pytest.mark.integration


def _check(p) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _hf_perplexity(model, tokenizer, texts: list[str], seq_length: int) -> tuple[float, int]:
    """The documented scheme with transformers alone: docs + EOS concatenated, windows of S + 1
    tokens overlapping by one."""
    stream = [t for text in texts for t in [*tokenizer.encode(text), tokenizer.eos_token_id]]
    nll, count = 0.0, 0
    for start in range(0, len(stream) - 1, seq_length):
        w = torch.tensor([stream[start : start + seq_length + 1]])
        with torch.no_grad():
            logits = model(w[:, :-1]).logits
        nll += float(torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
    return nll / count, count


@pytest.mark.distributed
def test_export_from_tp2_pp2_matches_and_imports_back(builtin_prefix: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.checkpoint.merge import load_trained_model
    from llm.data.tokenizer import load_tokenizer

    run_dir = tmp_path / "run"
    args = ["--config", "configs/tiny_cpu.yaml", *TINY_OVERRIDES, f"data.train_data_path={builtin_prefix}",
            f"logging.dir={run_dir}", "train.train_iters=4", "parallel.tensor_model_parallel_size=2",
            "parallel.pipeline_model_parallel_size=2", "deepspeed_config=configs/deepspeed/zero1.json"]  # fmt: skip
    _check(run(launch_cmd(4, *args)))
    hf_dir = tmp_path / "hf"
    _check(run(["python", script("convert_to_hf.py"), "--checkpoint", str(run_dir / "checkpoints"),
                "--output", str(hf_dir)]))  # fmt: skip
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "tokenizer.json").is_file()

    texts = ["The list type is a mutable sequence.", "héllo wörld ✓ 😀 12345\n\n  indented  twice", "x = [1, 2]\n"]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 6))
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert type(model).__name__ == "GPT2LMHeadModel"
    ours_tok = load_tokenizer("tokenizer/llm_sp8k.model")
    for text in texts:
        assert tokenizer.encode(text) == ours_tok.encode(text) and tokenizer.decode(ours_tok.encode(text)) == text

    cfg, ours = load_trained_model(run_dir / "checkpoints")
    x = torch.tensor([ours_tok.encode(" ".join(texts))])
    with torch.no_grad():
        diff = (ours(x)[..., : cfg.model.vocab_size] - model(x).logits).abs().max().item()
    assert diff < 1e-4

    p = run(["python", script("evaluate.py"), "--checkpoint", str(run_dir / "checkpoints"), "--input",
             str(held_out), "--json"])  # fmt: skip
    _check(p)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    loss, tokens = _hf_perplexity(model, tokenizer, texts * 6, cfg.model.seq_length)
    assert tokens == got["tokens"] and abs(loss - got["loss"]) / got["loss"] < 1e-4
    assert abs(math.exp(loss) - got["perplexity"]) / got["perplexity"] < 1e-4

    # import round trip: the transformers directory -> an llm checkpoint that evaluates the same and trains on
    imported = tmp_path / "imported"
    _check(run(["python", script("convert_to_hf.py"), "--import", str(hf_dir), "--output", str(imported),
                "--seq-length", str(cfg.model.seq_length)]))  # fmt: skip
    p = run(["python", script("evaluate.py"), "--checkpoint", str(imported), "--input", str(held_out), "--json"])
    _check(p)
    assert abs(json.loads(p.stdout.strip().splitlines()[-1])["loss"] - got["loss"]) / got["loss"] < 1e-5
    cont = tmp_path / "continued"
    resume = ["--config", str(imported / "config.yaml"), *TINY_OVERRIDES[4:], f"data.train_data_path={builtin_prefix}",
              f"logging.dir={cont}", "train.train_iters=4", f"checkpoint.resume={imported}"]  # fmt: skip
    p = run(launch_cmd(2, *resume, "parallel.tensor_model_parallel_size=2"))
    _check(p)
    losses = train_losses(cont)
    # same seed and batch sizes: the first batch is the original run's first batch, which the trained
    # (imported) weights predict better than the fresh ones did
    assert len(losses) == 4 and losses[0] < train_losses(run_dir)[0] - 0.1


def test_llama_export_loads_as_llama_and_agrees(builtin_prefix: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llm.checkpoint.merge import load_trained_model

    args = ["--config", "configs/tiny_cpu.yaml", *TINY_OVERRIDES, f"data.train_data_path={builtin_prefix}",
            f"logging.dir={tmp_path}", "train.train_iters=2", "model.architecture=llama",
            "model.num_query_groups=1"]  # fmt: skip
    _check(run(["python", script("pretrain.py"), *args]))
    _check(run(["python", script("convert_to_hf.py"), "--checkpoint", str(tmp_path / "checkpoints"),
                "--output", str(tmp_path / "hf")]))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 1
    cfg, ours = load_trained_model(tmp_path / "checkpoints")
    x = torch.randint(0, cfg.model.vocab_size or 1, (2, 32))
    with torch.no_grad():
        assert (ours(x)[..., : cfg.model.vocab_size] - model(x).logits).abs().max().item() < 1e-4
