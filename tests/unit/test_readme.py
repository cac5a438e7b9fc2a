"""The README cannot drift: every config file it names exists, every `section.key` it names is a
config key, and every `--option` of every scripts/ or benchmarks/ command it shows is one the script
accepts. Static (the scripts' own argparse help, read in-process), so it takes about a second."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
import typing
from pathlib import Path

import pytest

from llm.config import ALIASES, Config
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
SECTIONS = [
    f.name
    for f in dataclasses.fields(Config)
    if dataclasses.is_dataclass(typing.get_type_hints(Config)[f.name])
]


def _config_keys(cls: type = Config, prefix: str = "") -> set[str]:
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _config_keys(hints[f.name], f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            out.add(prefix + f.name)
    return out | set(ALIASES)


def _commands() -> list[str]:
    """Every shell command of the README's code blocks (continuation lines joined), and every inline
    code span that runs a script."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines + re.findall(r"`([^`\n]*(?:scripts|benchmarks)/\w+\.py[^`\n]*)`", README)


def _script_options(path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The options a script's argparse accepts, from its --help run in this process."""
    from tests.conftest import benchmark_module, script_main

    main = script_main(path.name) if path.parent.name == "scripts" else benchmark_module(path.name).main
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"]) if "argv" in main.__code__.co_varnames[: main.__code__.co_argcount] else main()
    return set(re.findall(r"(--[a-z][a-z0-9_-]*)", out.getvalue()))


def test_every_config_file_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bconfigs/[\w./-]*\w\.(?:yaml|json)", README))
    assert named, "the README names no config file: the pattern is wrong"
    assert sorted(n for n in named if not (REPO / n).is_file()) == []


def test_every_config_key_the_readme_names_exists() -> None:
    pattern = rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?)"
    named = {m.rstrip(".") for m in re.findall(pattern, README)}
    assert len(named) > 50, "the pattern finds too few keys"
    known = _config_keys()
    unknown = sorted(k for k in named if k not in known and not any(k2.startswith(k + ".") for k2 in known))
    assert unknown == []


def test_every_option_of_every_command_the_readme_shows_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    used: dict[Path, set[str]] = {}
    for command in _commands():
        for script, rest in re.findall(r"((?:scripts|benchmarks)/\w+\.py)((?:\s+[^|;&]*)?)", command):
            used.setdefault(REPO / script, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", rest))
    assert len(used) >= 10, sorted(used)  # the patterns find the commands
    problems = []
    for path, options in sorted(used.items()):
        if not path.is_file():
            problems.append(f"{path.relative_to(REPO)} does not exist")
            continue
        accepted = _script_options(path, monkeypatch)
        problems += [f"{path.relative_to(REPO)} {o}" for o in sorted(options - accepted)]
    assert problems == []


def test_the_cluster_config_table_is_what_the_planner_computes() -> None:
    from llm.config import load_config
    from llm.planner.memory import GB
    from llm.planner.report import config_layout, config_vocab
    from llm.planner.search import Cluster, evaluate_layout

    rows = re.findall(r"\| `(configs/cluster/[\w.]+\.yaml)` \| (\d+) nodes? x (\d+) \| [^|]*?: ([\d.]+) GiB(?:, bubble ([\d.]+)%)? \|",
                      README)  # fmt: skip
    assert len(rows) == 4
    for path, nodes, gpus, gib, bubble in rows:
        cfg = load_config(REPO / path)
        cluster = Cluster(int(nodes), int(gpus), gpu_memory_gb=80.0, peak_tflops=989.0)
        c = evaluate_layout(cfg, config_layout(cfg, int(nodes) * int(gpus)), cluster, precision="bf16",
                            vocab=config_vocab(cfg))  # fmt: skip
        assert (f"{c.memory.total / GB:.1f}", f"{100 * c.bubble:.1f}" if bubble else "") == (gib, bubble), (
            path
        )
