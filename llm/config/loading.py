"""Config trees from YAML files, dicts (a checkpoint's copy) and dotted overrides: type checks
against the schema's annotations, unknown keys named with the nearest known one, Megatron's names
for two data keys, then validation."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from llm.config.schema import Config, ConfigError
from llm.config.validation import validate


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting the harmless cases (int->float, '3e-4')."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not valid; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not one of {' | '.join(_type_name(o) for o in options)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; known keys here: {', '.join(sorted(known))}")


# Megatron-LM's names for our keys (its --data-path, --data-cache-path), accepted as written.
ALIASES = {"data.data_path": "train_data_path", "data.data_cache_path": "index_cache_dir"}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in ALIASES:
            key = ALIASES[full]
            if key in data:
                raise ConfigError(f"{full} is Megatron's name for {prefix}{key}; set only one of them")
            full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(full, names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, f"{full}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings -> a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"override '{item}': '{key}' is not a key like section.key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value of {key} is not valid YAML (quote it)") from None
        _set_dotted(tree, key, value)
    return tree


def _canonical_names(tree: dict[str, Any]) -> dict[str, Any]:
    """One source's settings (a YAML file, or the overrides) with Megatron's names (ALIASES) turned
    into ours, so that an override by either name replaces the file's value by either name. Both
    names in one source is an error, unless one of them is null (unset)."""
    out = dict(tree)
    for alias, key in ALIASES.items():
        section, name = alias.split(".")
        node = out.get(section)
        if not isinstance(node, dict) or name not in node:
            continue
        node = dict(node)
        value = node.pop(name)
        if node.get(key) is not None and value is not None:
            raise ConfigError(f"{alias} is Megatron's name for {section}.{key}; set only one of them")
        if value is not None or key not in node:
            node[key] = value
        out[section] = node
    return out


def merge_trees(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`base` with `extra`'s values in, section by section (a mapping may not replace a value)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value, f"{prefix}{key}.")
        elif isinstance(value, dict) and out.get(key) is not None:
            raise ConfigError(f"{prefix}{key}: expected a mapping of keys, got {out[key]!r}")
        else:
            out[key] = value
    return out


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> Config:
    """A validated Config from a plain dict (a YAML file's contents, or the copy in a checkpoint)."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (model:, train:, ...), got {raw!r}"
        )
    cfg: Config = _build(Config, raw, "")
    validate(cfg)
    return cfg


def replace_validated(cfg: Config, **sections: Any) -> Config:
    """A copy of `cfg` with whole sections replaced (`model=...`), validated like a loaded config.
    Code that derives settings (the vocabulary from the tokenizer, a model for one process) builds
    a new config this way instead of changing the one everything else holds."""
    out = dataclasses.replace(cfg, **sections)
    validate(out)
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML config (or the defaults when `path` is None) and applies dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file '{path}' does not exist; pass --config with a YAML file from configs/"
            )
        try:
            text = p.read_bytes().decode("utf-8")
        except OSError as e:
            raise ConfigError(f"config file '{path}' cannot be read: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file '{path}' is not UTF-8 text (byte {e.start}); pass a YAML file from configs/"
            ) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(e)}") from None
        except RecursionError:
            raise ConfigError(f"config file '{path}' nests too deeply to be a config") from None
        if raw is None:
            raise ConfigError(
                f"config file '{path}' is empty; copy one from configs/ or omit --config for the defaults"
            )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file '{path}': the top level must be a mapping of sections (model:, train:, ...)"
        )
    raw = merge_trees(_canonical_names(raw), _canonical_names(parse_overrides(overrides or [])))
    cfg: Config = _build(Config, raw, "")
    if cfg.deepspeed_config is not None and path is not None and not Path(cfg.deepspeed_config).exists():
        # Relative DeepSpeed paths: from the working directory, beside the YAML, or its parent.
        for base in (Path(path).parent, Path(path).parent.parent):
            if (base / cfg.deepspeed_config).exists():
                cfg.deepspeed_config = str(base / cfg.deepspeed_config)
                break
    validate(cfg)
    return cfg
