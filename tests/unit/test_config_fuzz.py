"""Property-based: malformed configs and overrides through `scripts/pretrain.py`'s own `main` never
start a run. Each case must end with exit status 1 and exactly one line, `error: ...`, naming the
key the user wrote (or the file), no traceback, and nothing created in the run directory.

The cases are generated from the config dataclasses themselves, so a key added later is fuzzed too;
what counts as out of range is written here, independently of the code's own table: no number in
the config may be negative, nan or infinite, and dropouts and Adam betas lie in [0, 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm.config import Config
from tests.conftest import REPO, script_main

MAX_EXAMPLES = 600
BELOW_ONE = {"model.dropout", "model.attention_dropout", "train.adam_beta1", "train.adam_beta2"}
CASES: dict[str, int] = {}


MAIN = script_main("pretrain.py")


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, annotation) for every setting, sections included."""
    out: list[tuple[str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        out.append((key, tp))
        if dataclasses.is_dataclass(tp):
            out.extend(_leaves(tp, f"{key}."))  # type: ignore[arg-type]
    return out


KEYS = _leaves(Config)
SECTIONS = {k for k, tp in KEYS if dataclasses.is_dataclass(tp)}


def _base(tp: Any) -> set[Any]:
    """The plain types an annotation accepts (Optional and unions unpacked; Literal kept)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return {b for a in typing.get_args(tp) if a is not type(None) for b in _base(a)}
    if typing.get_origin(tp) is list:
        return {list}
    return {tp}


words = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)
not_a_number = words.filter(lambda s: _float_or_none(s) is None)


def _float_or_none(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def bad_value(key: str, tp: Any) -> st.SearchStrategy[Any]:
    """A value `key` must refuse."""
    if key in SECTIONS:
        return st.one_of(st.integers(), words, st.lists(st.integers(), min_size=1, max_size=3))
    accepted = _base(tp)
    options: list[st.SearchStrategy[Any]] = [st.dictionaries(words, st.integers(), min_size=1, max_size=2)]
    literal = [a for a in accepted if typing.get_origin(a) is typing.Literal]
    if literal:
        choices = set(typing.get_args(literal[0]))
        options += [words.filter(lambda s: s not in choices), st.integers(), st.floats(allow_nan=False)]
    if list not in accepted:
        options.append(st.lists(st.integers(), min_size=1, max_size=3))
    if bool not in accepted:
        options.append(st.booleans())
    else:
        options += [st.integers(min_value=2), st.sampled_from(["yes", "no", "on", "1"])]
    if int in accepted:
        options += [st.integers(max_value=-1), st.floats(allow_nan=False, allow_infinity=False).filter(
            lambda x: not x.is_integer()), not_a_number]  # fmt: skip
    if float in accepted:
        options += [st.floats(max_value=-1e-12, allow_infinity=False), not_a_number,
                    st.sampled_from([math.nan, math.inf, -math.inf])]  # fmt: skip
        if key in BELOW_ONE:
            options.append(st.floats(min_value=1.0, max_value=1e6))
    if str in accepted and key in ("logging.dir", "checkpoint.resume"):
        options.append(st.sampled_from(["", "  "]))
    return st.one_of(options)


def unknown_key() -> st.SearchStrategy[str]:
    names = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)
    known = {k for k, _ in KEYS}
    sections = st.sampled_from(sorted(k for k in SECTIONS if "." not in k))
    nested = st.builds(lambda s, n: f"{s}.{n}", sections, names)
    return st.one_of(names, nested).filter(lambda k: k not in known)


def _as_yaml_scalar(value: Any) -> str:
    """An override's text whose YAML reading is `value`."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, Any, str]:
    """(how, payload, what the error line must name: a key, or '<file>')."""
    kind = draw(st.sampled_from(["file-value", "override-value"] * 4 + ["file-unknown", "override-unknown",
                                 "top-level", "empty", "not-utf8", "bad-yaml", "bad-override"]))  # fmt: skip
    if kind in ("file-value", "override-value"):
        key, tp = draw(st.sampled_from(KEYS))
        return kind, (key, draw(bad_value(key, tp))), key
    if kind in ("file-unknown", "override-unknown"):
        key = draw(unknown_key())
        return kind, (key, draw(st.integers())), key
    if kind == "top-level":
        return kind, draw(st.one_of(st.lists(st.integers(), min_size=1), st.integers(), words.filter(
            lambda s: not isinstance(yaml.safe_load(json.dumps(s)), dict)))), "<file>"  # fmt: skip
    if kind == "empty":
        return kind, draw(st.sampled_from(["", "\n", "# only a comment\n", "---\n"])), "<file>"
    if kind == "not-utf8":
        junk = draw(st.binary(min_size=1, max_size=64).filter(_not_utf8))
        return kind, b"model:\n  num_layers: 2\n" + junk, "<file>"
    if kind == "bad-yaml":
        return (
            kind,
            draw(st.sampled_from(["a: [", "model: {", "\tmodel: 1", "model:\n  x: 1\n y: 2", "*x"])),
            "<file>",
        )
    bad = draw(st.one_of(words.filter(lambda s: "=" not in s), st.sampled_from(["=1", ".=1", "train..lr=1",
                                                                                "train.lr=[1", "model.=2"])))  # fmt: skip
    return kind, bad, bad


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _base_config(tmp: Path) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    raw["deepspeed_config"] = str(REPO / raw["deepspeed_config"])
    raw["data"]["train_data_path"] = str(tmp / "no-such-data")  # a case that wrongly passes fails fast
    raw["logging"]["dir"] = str(tmp / "run")
    raw["logging"]["wandb_mode"] = "disabled"
    return raw


def _argv(kind: str, payload: Any, tmp: Path) -> list[str]:
    path = tmp / "config.yaml"
    raw = _base_config(tmp)
    overrides: list[str] = []
    if kind in ("file-value", "file-unknown"):
        _set(raw, *payload)
    elif kind in ("override-value", "override-unknown"):
        overrides.append(f"{payload[0]}={_as_yaml_scalar(payload[1])}")
    elif kind == "bad-override":
        overrides.append(payload)
    if kind == "not-utf8":
        path.write_bytes(payload)
    elif kind in ("empty", "bad-yaml"):
        path.write_text(payload)
    elif kind == "top-level":
        path.write_text(yaml.safe_dump(payload))
    else:
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return ["--config", str(path), *overrides]


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
@given(cases())
def _one_malformed_config_ends_in_one_error_line(case: tuple[str, Any, str]) -> None:
    kind, payload, names = case
    tmp = Path(tempfile.mkdtemp(prefix="cfgfuzz-"))
    try:
        argv = _argv(kind, payload, tmp)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = MAIN(argv)
        lines = err.getvalue().splitlines()
        assert status == 1, (kind, payload, err.getvalue())
        assert len(lines) == 1 and lines[0].startswith("error: "), (kind, payload, err.getvalue())
        expected = str(tmp / "config.yaml") if names == "<file>" else names
        assert expected in lines[0], (kind, payload, lines[0])
        assert "Traceback" not in err.getvalue() + out.getvalue()
        assert not (tmp / "run").exists(), (kind, payload)
        CASES[kind] = CASES.get(kind, 0) + 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_malformed_configs_and_overrides_end_in_one_error_line() -> None:
    """The property over every generated case, then that every kind of case was tried (one test, so
    that the count is this run's wherever pytest runs it); how many are printed."""
    CASES.clear()
    _one_malformed_config_ends_in_one_error_line()
    print(f"config fuzz cases: {sum(CASES.values())} {dict(sorted(CASES.items()))}")
    assert len(CASES) == 9 and sum(CASES.values()) >= MAX_EXAMPLES // 2, CASES
