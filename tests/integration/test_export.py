"""Hugging Face export from a TP2 x PP2 checkpoint, and import back, with real transformers."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from llm.config import load_config
from tests.conftest import TINY_OVERRIDES, launch_cmd, run, script, train_losses, write_lm_eval_tasks

pytestmark = pytest.mark.integration


def _check(p) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _in_process(name: str, *argv: str) -> str:
    """scripts/<name> run in this process (its command line is the llama test's subprocess and
    test_pretrain's): what it printed."""
    from tests.conftest import script_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert script_main(name)(list(argv)) == 0
    return out.getvalue()


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
    _in_process("convert_to_hf.py", "--checkpoint", str(run_dir / "checkpoints"), "--output", str(hf_dir))
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "tokenizer.json").is_file()

    texts = [
        "The list type is a mutable sequence.",
        "héllo wörld ✓ 😀 12345\n\n  indented  twice",
        "x = [1, 2]\n",
    ]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 6))
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert type(model).__name__ == "GPT2LMHeadModel"
    ours_tok = load_tokenizer("tokenizer/llm_sp8k.model")
    for text in texts:
        assert (
            tokenizer.encode(text) == ours_tok.encode(text)
            and tokenizer.decode(ours_tok.encode(text)) == text
        )

    cfg, ours = load_trained_model(run_dir / "checkpoints")
    x = torch.tensor([ours_tok.encode(" ".join(texts))])
    with torch.no_grad():
        diff = (ours(x)[..., : cfg.model.vocab_size] - model(x).logits).abs().max().item()
    assert diff < 1e-4

    printed = _in_process(
        "evaluate.py", "--checkpoint", str(run_dir / "checkpoints"), "--input", str(held_out), "--json"
    )
    got = json.loads(printed.strip().splitlines()[-1])
    loss, tokens = _hf_perplexity(model, tokenizer, texts * 6, cfg.model.seq_length)
    assert tokens == got["tokens"] and abs(loss - got["loss"]) / got["loss"] < 1e-4
    assert abs(math.exp(loss) - got["perplexity"]) / got["perplexity"] < 1e-4

    _check_lm_eval(run_dir / "checkpoints", hf_dir, tmp_path)

    # import round trip: the transformers directory -> an llm checkpoint that evaluates the same and trains on
    imported = tmp_path / "imported"
    _in_process("convert_to_hf.py", "--import", str(hf_dir), "--output", str(imported), "--seq-length",
                str(cfg.model.seq_length))  # fmt: skip
    saved = load_config(imported / "config.yaml")  # it trains into the import's directory, not tiny_cpu's run
    assert (saved.logging.dir, saved.checkpoint_dir, saved.checkpoint.resume) == (
        str(imported),
        str(imported),
        "auto",
    )
    printed = _in_process("evaluate.py", "--checkpoint", str(imported), "--input", str(held_out), "--json")
    assert abs(json.loads(printed.strip().splitlines()[-1])["loss"] - got["loss"]) / got["loss"] < 1e-5
    cont = tmp_path / "continued"
    resume = ["--config", str(imported / "config.yaml"), *TINY_OVERRIDES[4:], f"data.train_data_path={builtin_prefix}",
              f"logging.dir={cont}", "train.train_iters=4", f"checkpoint.resume={imported}"]  # fmt: skip
    p = run(launch_cmd(2, *resume, "parallel.tensor_model_parallel_size=2"))
    _check(p)
    losses = train_losses(cont)
    # same seed and batch sizes: the first batch is the original run's first batch, which the trained
    # (imported) weights predict better than the fresh ones did
    assert len(losses) == 4 and losses[0] < train_losses(run_dir)[0] - 0.1


def _check_lm_eval(checkpoint: Path, hf_dir: Path, tmp_path: Path) -> None:
    """lm-eval through evaluate.py on the TP2 x PP2 checkpoint, no export: a multiple-choice and a
    rolling-loglikelihood task written here, scored per document like lm-eval's own `hf` model on
    the Hugging Face export of the same checkpoint."""
    import lm_eval

    from llm.checkpoint.merge import load_trained_model
    from llm.data.tokenizer import run_tokenizer
    from llm.eval.harness import task_manager
    from tests.conftest import script_main

    tasks, names = write_lm_eval_tasks(tmp_path / "tasks")
    out = tmp_path / "lm_eval.json"
    argv = ["--checkpoint", str(checkpoint), "--tasks", ",".join(names), "--include-path", str(tasks),
            "--output", str(out), "--log-samples"]  # fmt: skip
    assert script_main("evaluate.py")(argv) == 0
    ours = json.loads(out.read_text())
    assert (
        set(ours["results"]) == set(names) and ours["results"]["llm_test_rolling"]["word_perplexity,none"] > 1
    )

    cfg, _ = load_trained_model(checkpoint)
    # Our documents follow an EOS (preprocessing appends one to each), so EOS conditions an empty
    # context; lm-eval's hf model would take the tokenizer's BOS unless told.
    eos = run_tokenizer(cfg.data.tokenizer, None).eos_id
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},device=cpu,prefix_token_id={eos}",
                                     tasks=names,
                                     task_manager=task_manager(names, str(tasks)),
                                     log_samples=True)  # fmt: skip
    assert theirs is not None
    for name in names:
        a = [s["filtered_resps"] for s in ours["samples"][name]]
        b = [s["filtered_resps"] for s in theirs["samples"][name]]
        flat_a, flat_b = (
            torch.tensor(a, dtype=torch.float64).flatten(),
            torch.tensor(b, dtype=torch.float64).flatten(),
        )
        assert len(a) == len(b) and torch.allclose(flat_a, flat_b, rtol=1e-4, atol=1e-4), (name, a, b)
        for metric, value in theirs["results"][name].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert abs(ours["results"][name][metric] - value) <= 1e-4 * max(1.0, abs(value)), (
                    name,
                    metric,
                )


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


def test_lm_eval_runs_the_shipped_local_task_and_a_hub_task_offline_is_one_line(
    reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The README's `--include-path` example is shipped and runs offline; a task whose dataset lives
    on the hub, offline and not cached, ends in one line saying so (it used to retry for half a
    minute and end in a 45-line traceback)."""
    import datasets.config
    import huggingface_hub.constants

    from tests.conftest import REPO, script_main

    monkeypatch.chdir(REPO)  # the example's data_files are relative to the repository root
    checkpoint = str(reference_run / "checkpoints")
    out = tmp_path / "example.json"
    evaluate = script_main("evaluate.py")
    assert evaluate(["--checkpoint", checkpoint, "--tasks", "llm_example", "--include-path", "examples/lm_eval_tasks",
                     "--output", str(out)]) == 0  # fmt: skip
    assert 0 <= json.loads(out.read_text())["results"]["llm_example"]["acc,none"] <= 1

    tasks = tmp_path / "hub_tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        (REPO / "examples/lm_eval_tasks/llm_example.yaml").read_text().replace("task: llm_example", "task: hub_task")
        .replace("dataset_path: json", "dataset_path: llm-tests/no-such-dataset")
    )  # fmt: skip
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    capsys.readouterr()
    assert evaluate(["--checkpoint", checkpoint, "--tasks", "hub_task", "--include-path", str(tasks)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: lm-eval task hub_task needs its dataset 'llm-tests/no-such-dataset' from the "
                          "Hugging Face hub, the hub is not reachable from here") and err.count("\n") == 1, err  # fmt: skip


def test_export_and_import_never_replace_what_a_directory_holds(
    reference_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An export into a directory that holds anything (an earlier export, other files) is refused in
    one line naming --overwrite, and the directory is left as it was; --overwrite replaces an earlier
    export and nothing else; an export is written beside its target and renamed into place (no partial
    directory is left). An import into a directory that holds checkpoints is refused (it would move
    `latest` to the import)."""
    from tests.conftest import script_main

    convert = script_main("convert_to_hf.py")
    checkpoints = reference_run / "checkpoints"
    hf = tmp_path / "hf"
    assert convert(["--checkpoint", str(checkpoints), "--output", str(hf)]) == 0
    exported = {p.name: p.read_bytes() for p in hf.iterdir()}
    assert "model.safetensors" in exported and "llm_export.json" in exported
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for target, held in ((hf, exported), (other, {"notes.txt": b"mine"})):
        capsys.readouterr()
        assert convert(["--checkpoint", str(checkpoints), "--output", str(target)]) == 1
        assert capsys.readouterr().err == (
            f"error: --output '{target}' exists and is not empty: export into a new directory, or pass "
            "--overwrite to replace an earlier export there\n"
        )
        assert {p.name: p.read_bytes() for p in target.iterdir()} == held
    assert convert(["--checkpoint", str(checkpoints), "--output", str(other), "--overwrite"]) == 1
    assert capsys.readouterr().err == (
        f"error: --output '{other}' holds files that are not an earlier export (no llm_export.json); "
        "--overwrite replaces only an export: choose another directory\n"
    )
    assert {p.name: p.read_bytes() for p in other.iterdir()} == {"notes.txt": b"mine"}
    (hf / "stale.bin").write_bytes(b"from an earlier export")
    assert convert(["--checkpoint", str(checkpoints), "--output", str(hf), "--overwrite"]) == 0
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == exported  # the new export, and only it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes"]  # nothing partial or old left

    before = {p.relative_to(checkpoints): p.stat().st_mtime_ns for p in checkpoints.rglob("*")}
    capsys.readouterr()
    assert convert(["--import", str(hf), "--output", str(checkpoints)]) == 1
    assert capsys.readouterr().err.startswith(f"error: --output '{checkpoints}' already holds checkpoints")
    assert {p.relative_to(checkpoints): p.stat().st_mtime_ns for p in checkpoints.rglob("*")} == before


def test_an_imported_checkpoint_is_checksummed_weights_included(reference_run: Path, tmp_path: Path) -> None:
    """An import holds only the layout-independent form (universal/): its MANIFEST lists those files
    too, so a damaged weight file is found before any resume loads it (it used to list llm_meta.json
    alone, and a flipped byte in the weights resumed silently)."""
    from llm.checkpoint.format import CheckpointError, verify_checkpoint
    from tests.conftest import script_main

    convert = script_main("convert_to_hf.py")
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    assert convert(["--checkpoint", str(reference_run / "checkpoints"), "--output", str(hf)]) == 0
    assert convert(["--import", str(hf), "--output", str(imported)]) == 0
    tag_dir = imported / "iter_0000000"
    listed = json.loads((tag_dir / "MANIFEST.json").read_text())["files"]
    weights = sorted(str(p.relative_to(tag_dir)) for p in (tag_dir / "universal").rglob("*") if p.is_file())
    assert len(weights) > 10 and set(weights) <= set(listed)
    verify_checkpoint(tag_dir)
    damaged = tag_dir / weights[len(weights) // 2]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint file '{damaged}' is damaged"):
        verify_checkpoint(tag_dir)
