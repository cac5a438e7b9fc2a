"""The typed configuration tree: YAML load, dotted overrides, validation, DeepSpeed dict.

One tree is the source of truth. YAML files mirror it (and only list what differs from the
defaults), unknown keys are errors, derived values are properties, and the DeepSpeed config is
derived from it. A user's DeepSpeed JSON may add ZeRO/offload knobs; a value that conflicts with
one we derive (batch sizes, clipping, precision, optimizer, scheduler) is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from llm.errors import LLMError

Architecture = Literal["gpt2", "llama"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DecayStyle = Literal["cosine", "linear", "constant"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
PartitionMethod = Literal["parameters", "uniform", "type:TransformerBlock"]
Optimizer = Literal["adamw", "sgd"]
Exchange = Literal["fp32", "bf16", "fp16", "int8", "int4"]
CommDtype = Literal["fp32", "bf16", "fp16"]


class ConfigError(LLMError, ValueError):
    """A user mistake in the configuration; the message names the setting and the fix."""


@dataclass
class ModelConfig:
    architecture: Architecture = "gpt2"
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_query_groups: int | None = None  # llama GQA; None = num_attention_heads (MHA)
    ffn_hidden_size: int | None = None  # None = 4h (gpt2) or 8h/3 rounded up to 256 (llama)
    seq_length: int = 1024
    max_position_embeddings: int | None = None  # None = seq_length
    vocab_size: int | None = None  # None = taken from the tokenizer
    make_vocab_size_divisible_by: int = 128
    dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool | None = None  # None = True for gpt2, False for llama
    activation_checkpointing: bool = False
    sequence_parallel: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # x + attn(norm(x)) + mlp(norm(x)) (GPT-J, PaLM): one tensor-parallel reduction per layer
    parallel_block: bool = False
    parallel_block_norms: int = 1  # 2: GPT-NeoX's form, attention and MLP each with its own norm
    compile: bool = False  # torch.compile each transformer block

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.architecture == "llama":
            return 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        return 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def tied(self) -> bool:
        if self.tie_embeddings is None:
            return self.architecture == "gpt2"
        return self.tie_embeddings

    @property
    def is_llama(self) -> bool:
        return self.architecture == "llama"

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is unknown: set it or set data.tokenizer")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class SpikeDetectionConfig:
    """A loss spike: non-finite, or (once `window` losses are known) above both mean + num_std x std
    and min_ratio x mean of the last `window` iterations."""

    window: int = 50  # 0 = only non-finite losses count as spikes
    num_std: float = 6.0
    min_ratio: float = 1.5


@dataclass
class TrainConfig:
    train_iters: int = 1000
    micro_batch_size: int = 4
    global_batch_size: int = 32
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    lr_warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None = train_iters
    lr_decay_style: DecayStyle = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    optimizer: Optimizer = "adamw"  # sgd: torch's SGD with train.sgd_momentum (e.g. DiLoCo's inner one)
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0
    seed: int = 1234
    precision: Precision = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    exit_interval: int | None = None
    spike_detection: SpikeDetectionConfig = field(default_factory=SpikeDetectionConfig)
    max_rollbacks: int = 3  # reloads of the latest checkpoint after spikes before the run stops
    skip_batches_on_rollback: int = 0  # global batches skipped after the spiking one, besides those up to it
    # Global batches never to train, as "a-b" or "a": numbered as the iterations of an uninterrupted
    # run that train them (what a rollback skips automatically, given by hand: the data around a spike
    # seen in an earlier run). Steps go on with the next batch; the iteration count does not jump.
    skip_batches: list[str] = field(default_factory=list)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def skip_ranges(self) -> list[tuple[int, int]]:
        """train.skip_batches as (first, last) batch numbers, 1-based and inclusive."""
        out = []
        for item in self.skip_batches:
            first, _, last = str(item).partition("-")
            out.append((int(first), int(last or first)))
        return out


@dataclass
class DataConfig:
    train_data_path: str | list[Any] | None = None
    valid_data_path: str | list[Any] | None = None
    test_data_path: str | list[Any] | None = None
    split: str = "969,30,1"
    tokenizer: str | None = None
    index_cache_dir: str | None = None  # None = <prefix dir>/index-cache
    num_workers: int = 0
    # Document-aware training (Megatron's names): attention stays inside each document of a sample,
    # positions restart at each document, the loss of the prediction made at an EOD is not counted.
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    eod_token_id: int | None = None  # None = the tokenizer's EOS (what preprocessing appends)
    # resume on data other than the checkpoint's (other files, blend, split or seed): announced, not refused
    allow_changed_data: bool = False

    @property
    def document_aware(self) -> bool:
        return self.reset_attention_mask or self.reset_position_ids or self.eod_mask_loss


@dataclass
class DilocoConfig:
    """DiLoCo islands (Douillard et al. 2023) and Streaming DiLoCo (2025): `islands` groups of ranks
    train on their own for `inner_steps` steps, then average their outer gradient (start-of-round
    weights minus current weights) across islands and apply it with Nesterov momentum (README, "DiLoCo
    islands"). islands = 1: ordinary synchronous training (the default)."""

    islands: int = 1
    inner_steps: int = 500  # H: inner optimizer steps per round
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    exchange: Exchange = "fp32"  # the outer gradient on the wire: fp32, bf16/fp16, int8 or int4 blockwise
    quant_block_size: int = 128  # elements per scale of int8/int4
    error_feedback: bool = True  # keep what quantization lost and add it to the next round's outer gradient
    fragments: int = 1  # Streaming DiLoCo: fragments synchronized at staggered steps (1 = all at once)
    delay: int = 0  # tau: inner steps the exchange overlaps before the outer update is applied
    mixing: float = 0.5  # with delay > 0: new weights = mixing x local + (1 - mixing) x outer result


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    pipeline_partition_method: PartitionMethod = "parameters"
    timeout_minutes: float = 30.0  # a collective waiting longer fails (a hung or stopped rank)
    # DeepSpeed's gradient reduction dtype (its `communication_data_type`); None = the training dtype
    communication_data_type: CommDtype | None = None
    diloco: DilocoConfig = field(default_factory=DilocoConfig)


@dataclass
class EvalConfig:
    eval_interval: int = 1000
    eval_iters: int = 10
    # lm-evaluation-harness tasks during training (rank 0, TP 1, PP 1, ZeRO < 3; scripts/pretrain.py)
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_interval: int | None = None  # None = eval.eval_interval
    lm_eval_limit: float | None = None  # examples per task (or a fraction)
    lm_eval_num_fewshot: int | None = None
    lm_eval_include_path: str | None = None  # a directory of task YAMLs


@dataclass
class LoggingConfig:
    log_interval: int = 10
    dir: str = "runs/default"
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_mode: WandbMode = "auto"  # auto = online when logged in, else offline
    tensorboard_dir: str | None = None  # Megatron's --tensorboard-dir: event files of the same scalars


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None = <logging.dir>/checkpoints
    save_interval: int | None = None
    resume: str = "auto"  # auto | none | a checkpoint directory
    keep_last: int | None = None
    verify: bool = True  # check every file's checksum before resuming
    break_lock: bool = False  # take over a run directory another host's run seems to hold
    # unpickle checkpoint files without restriction (they could run code): only for a checkpoint you trust
    trust_pickles: bool = False


@dataclass
class DebugConfig:
    """Fault injection for testing recovery; off by default."""

    # Iterations (numbered as in an uninterrupted run): the global batch each of them trains gets a
    # non-finite (nan) or huge (x1e8) loss, before backward. A batch skipped after a rollback is
    # never trained again, so each injection happens once.
    inject_loss_spike_at: list[int] = field(default_factory=list)
    inject_loss_value: Literal["nan", "huge"] = "nan"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    deepspeed_config: str | None = None

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.logging.dir) / "checkpoints")

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel ranks of one island (of the world without DiLoCo islands)."""
        p = self.parallel
        return world_size // (
            p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.diloco.islands
        )

    def grad_accumulation_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size) * self.parallel.diloco.islands
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def island_batch_size(self) -> int:
        """The samples of one global batch that each island trains on (all of them without islands)."""
        return self.train.global_batch_size // self.parallel.diloco.islands

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building from dicts


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


def _merge(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{prefix}{key}.")
        elif isinstance(value, dict) and out.get(key) is not None:
            raise ConfigError(f"{prefix}{key}: expected a mapping of keys, got {out[key]!r}")
        else:
            out[key] = value
    return out


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> Config:
    """A validated Config from a plain dict (a YAML file's contents, or the copy in a checkpoint)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model:, train:, ...), got {raw!r}")
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
            raise ConfigError(f"config file '{path}' is empty; copy one from configs/ or omit --config for the defaults")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}': the top level must be a mapping of sections (model:, train:, ...)")
    raw = _merge(_canonical_names(raw), _canonical_names(parse_overrides(overrides or [])))
    cfg: Config = _build(Config, raw, "")
    if cfg.deepspeed_config is not None and path is not None and not Path(cfg.deepspeed_config).exists():
        # Relative DeepSpeed paths: from the working directory, beside the YAML, or its parent.
        for base in (Path(path).parent, Path(path).parent.parent):
            if (base / cfg.deepspeed_config).exists():
                cfg.deepspeed_config = str(base / cfg.deepspeed_config)
                break
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------- validation


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalized [train, valid, test] fractions."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"data.split = {split!r} is not a list of numbers like '969,30,1'") from None
    if not parts or len(parts) > 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"data.split = {split!r}: give 1-3 non-negative weights like '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


# What each number may be: (rule, text for the message). None (unset) always passes.
_RULES: dict[str, tuple[Any, str]] = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non-negative": (lambda v: v >= 0, "must be 0 or more"),
    "fraction": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "ratio>=1": (lambda v: v >= 1, "must be at least 1"),
    "seed": (lambda v: 0 <= v < 2**32, "must lie in [0, 2**32)"),
}
_RANGES: dict[str, str] = {
    "model.num_layers": "positive",
    "model.hidden_size": "positive",
    "model.num_attention_heads": "positive",
    "model.num_query_groups": "positive",
    "model.ffn_hidden_size": "positive",
    "model.seq_length": "positive",
    "model.max_position_embeddings": "positive",
    "model.vocab_size": "positive",
    "model.make_vocab_size_divisible_by": "positive",
    "model.dropout": "fraction",
    "model.attention_dropout": "fraction",
    "model.norm_eps": "positive",
    "model.rope_theta": "positive",
    "model.init_std": "positive",
    "train.train_iters": "positive",
    "train.micro_batch_size": "positive",
    "train.global_batch_size": "positive",
    "train.lr": "non-negative",
    "train.min_lr": "non-negative",
    "train.lr_warmup_iters": "non-negative",
    "train.lr_decay_iters": "positive",
    "train.weight_decay": "non-negative",
    "train.adam_beta1": "fraction",
    "train.adam_beta2": "fraction",
    "train.adam_eps": "positive",
    "train.clip_grad": "non-negative",
    "train.seed": "seed",
    "train.exit_interval": "positive",
    "train.max_rollbacks": "non-negative",
    "train.skip_batches_on_rollback": "non-negative",
    "train.spike_detection.window": "non-negative",
    "train.spike_detection.num_std": "positive",
    "train.spike_detection.min_ratio": "ratio>=1",
    "data.num_workers": "non-negative",
    "data.eod_token_id": "non-negative",
    "parallel.tensor_model_parallel_size": "positive",
    "parallel.pipeline_model_parallel_size": "positive",
    "parallel.timeout_minutes": "positive",
    "parallel.diloco.islands": "positive",
    "parallel.diloco.inner_steps": "positive",
    "parallel.diloco.outer_lr": "positive",
    "parallel.diloco.outer_momentum": "fraction",
    "parallel.diloco.quant_block_size": "positive",
    "parallel.diloco.fragments": "positive",
    "parallel.diloco.delay": "non-negative",
    "parallel.diloco.mixing": "fraction",
    "train.sgd_momentum": "fraction",
    "eval.eval_interval": "positive",
    "eval.eval_iters": "non-negative",
    "eval.lm_eval_interval": "positive",
    "eval.lm_eval_limit": "positive",
    "eval.lm_eval_num_fewshot": "non-negative",
    "logging.log_interval": "positive",
    "checkpoint.save_interval": "positive",
    "checkpoint.keep_last": "positive",
}


def _value_at(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check_ranges(cfg: Config) -> None:
    """Every number on its own: the message names the key as the user wrote it."""
    for key, rule in _RANGES.items():
        value = _value_at(cfg, key)
        ok, text = _RULES[rule]
        if value is not None and not ok(value):
            raise ConfigError(f"{key} = {value} {text}")
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr ({cfg.train.min_lr}) must not exceed train.lr ({cfg.train.lr})")
    for key in ("logging.dir", "checkpoint.resume"):
        if not str(_value_at(cfg, key)).strip():
            raise ConfigError(f"{key} is empty; give a directory")
    parse_split(cfg.data.split)


def _check_model(m: ModelConfig) -> None:
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
            f"({m.num_attention_heads})"
        )
    if m.num_query_groups is not None:
        if m.architecture != "llama" and m.num_query_groups != m.num_attention_heads:
            raise ConfigError(
                "model.num_query_groups (grouped-query attention) needs model.architecture: llama"
            )
        if m.num_query_groups <= 0 or m.num_attention_heads % m.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads ({m.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({m.num_query_groups})"
            )
    if m.architecture == "gpt2" and m.max_positions < m.seq_length:
        raise ConfigError("model.max_position_embeddings must be at least model.seq_length")
    if m.architecture == "llama" and m.head_dim % 2:
        raise ConfigError("rotary embeddings need an even head size (hidden_size / num_attention_heads)")
    if m.parallel_block_norms not in (1, 2):
        raise ConfigError(f"model.parallel_block_norms = {m.parallel_block_norms}: use 1 (GPT-J, PaLM) or 2 (GPT-NeoX)")
    if m.parallel_block_norms == 2 and not m.parallel_block:
        raise ConfigError("model.parallel_block_norms = 2 needs model.parallel_block: true")


def _check_tensor_parallel(m: ModelConfig, tp: int) -> None:
    for key, value in [
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.ffn_hidden_size", m.ffn_size),
    ]:
        if value % tp:
            raise ConfigError(
                f"{key} ({value}) must be divisible by parallel.tensor_model_parallel_size ({tp}); "
                "choose a tensor-parallel size that divides it"
            )
    groups = m.kv_groups
    if groups % tp and tp % groups:
        raise ConfigError(
            f"model.num_query_groups ({groups}) and parallel.tensor_model_parallel_size ({tp}) must divide one "
            "another (KV groups are split across ranks, or shared by TP / groups ranks)"
        )
    if groups < tp and m.head_dim % (tp // groups):
        raise ConfigError(
            f"with fewer KV groups than TP ranks the head size ({m.head_dim}) must be divisible by "
            f"TP / num_query_groups ({tp // groups})"
        )
    if m.sequence_parallel and m.seq_length % tp:
        raise ConfigError(
            f"model.seq_length ({m.seq_length}) must be divisible by parallel.tensor_model_parallel_size ({tp}) "
            "with model.sequence_parallel"
        )


def _check_parallel(cfg: Config) -> None:
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    if cfg.model.sequence_parallel and tp == 1:
        raise ConfigError("model.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    _check_tensor_parallel(cfg.model, tp)
    if pp > cfg.model.num_layers + 2:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size ({pp}) exceeds the number of pipeline layers "
            f"(model.num_layers + 2 = {cfg.model.num_layers + 2})"
        )


def _check_diloco(cfg: Config) -> None:
    d = cfg.parallel.diloco
    if d.islands == 1:
        return
    if d.fragments > d.inner_steps:
        raise ConfigError(
            f"parallel.diloco.fragments ({d.fragments}) exceeds parallel.diloco.inner_steps ({d.inner_steps}): "
            "each fragment needs at least one inner step of its own"
        )
    if d.fragments > cfg.model.num_layers:
        raise ConfigError(
            f"parallel.diloco.fragments ({d.fragments}) exceeds model.num_layers ({cfg.model.num_layers}): "
            "fragments are runs of layers"
        )
    if d.delay >= d.inner_steps:
        raise ConfigError(
            f"parallel.diloco.delay ({d.delay}) must be smaller than parallel.diloco.inner_steps ({d.inner_steps}): "
            "an exchange must land before its fragment's next round ends"
        )
    if cfg.train.global_batch_size % d.islands:
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"parallel.diloco.islands ({d.islands}): each island trains on an equal slice of every global batch"
        )
    if cfg.train.precision == "fp16":
        raise ConfigError("parallel.diloco with train.precision: fp16 is not supported; use bf16 or fp32")


def _check_lm_eval(cfg: Config) -> None:
    tasks = cfg.eval.lm_eval_tasks
    if not all(isinstance(t, str) and t.strip() for t in tasks):
        raise ConfigError(f"eval.lm_eval_tasks: {tasks!r} must be a list of task names")
    if tasks and (cfg.parallel.tensor_model_parallel_size > 1 or cfg.parallel.pipeline_model_parallel_size > 1):
        raise ConfigError(
            "eval.lm_eval_tasks during training needs parallel.tensor_model_parallel_size and "
            "pipeline_model_parallel_size 1 (rank 0 scores its whole model); run scripts/evaluate.py --tasks "
            "on the checkpoints instead"
        )


def _check_documents(cfg: Config) -> None:
    d = cfg.data
    if d.document_aware and d.eod_token_id is None and d.tokenizer is None:
        flags = [k for k in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss") if getattr(d, k)]
        raise ConfigError(
            f"data.{flags[0]} needs the id of the end-of-document token: set data.tokenizer or data.eod_token_id"
        )
    if d.eod_token_id is not None and cfg.model.vocab_size is not None and d.eod_token_id >= cfg.model.vocab_size:
        raise ConfigError(
            f"data.eod_token_id = {d.eod_token_id} is outside the vocabulary (model.vocab_size = {cfg.model.vocab_size})"
        )


def _check_faults(cfg: Config) -> None:
    bad = [x for x in cfg.debug.inject_loss_spike_at if not isinstance(x, int) or isinstance(x, bool) or x < 1]
    if bad:
        raise ConfigError(f"debug.inject_loss_spike_at: {bad} are not iterations (positive integers)")


def validate(cfg: Config) -> None:
    """Checks everything that can be checked without knowing the world size."""
    _check_ranges(cfg)
    _check_documents(cfg)
    _check_faults(cfg)
    _check_lm_eval(cfg)
    _check_model(cfg.model)
    _check_parallel(cfg)
    _check_diloco(cfg)
    for item in cfg.train.skip_batches:
        first, _, last = str(item).partition("-")
        if not (first.isdigit() and (last.isdigit() or not last) and 1 <= int(first) <= int(last or first)):
            raise ConfigError(
                f"train.skip_batches: '{item}' is not a range of batch numbers like '120-135' (or one number, 1 or more)"
            )
    if cfg.train.lr_warmup_iters > cfg.train.decay_iters:
        t = cfg.train
        decay = f"train.lr_decay_iters = {t.lr_decay_iters}" if t.lr_decay_iters else f"train.train_iters = {t.train_iters}"
        raise ConfigError(
            f"train.lr_warmup_iters = {t.lr_warmup_iters} must not exceed {decay}: lower train.lr_warmup_iters "
            f"(e.g. train.lr_warmup_iters={max(t.decay_iters // 10, 0)}) or train longer"
        )
    if cfg.deepspeed_config is not None and not Path(cfg.deepspeed_config).is_file():
        raise ConfigError(
            f"deepspeed_config '{cfg.deepspeed_config}' does not exist; use one of configs/deepspeed/*.json"
        )


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of processes."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    islands = cfg.parallel.diloco.islands
    if world_size % (tp * pp * islands):
        what = f"islands x TP x PP = {islands} x {tp} x {pp}" if islands > 1 else f"TP x PP = {tp} x {pp}"
        raise ConfigError(f"world size {world_size} is not divisible by {what}")
    dp = cfg.data_parallel_size(world_size) * islands
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        ranks = (
            f"data-parallel size x islands ({dp // islands} x {islands})"
            if islands > 1
            else "data-parallel size"
        )
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x {ranks} ({cfg.train.micro_batch_size} x {dp} = {per_step})"
        )


# ------------------------------------------------------------------------------ DeepSpeed config


def resolve_precision(precision: str, *, cuda: bool) -> str:
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def _derived_deepspeed(cfg: Config, world_size: int, *, cuda: bool) -> dict[str, Any]:
    precision = resolve_precision(cfg.train.precision, cuda=cuda)
    if precision == "fp16" and not cuda:
        raise ConfigError(
            "train.precision: fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU); use fp32 or bf16"
        )
    t = cfg.train
    return {
        "train_batch_size": cfg.island_batch_size(),  # DeepSpeed sees one island
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(world_size),
        "gradient_clipping": t.clip_grad,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": _optimizer_entry(t, cuda=cuda),
        **({"communication_data_type": comm} if (comm := cfg.parallel.communication_data_type) else {}),
    }


def _optimizer_entry(t: TrainConfig, *, cuda: bool) -> dict[str, Any]:
    if t.optimizer == "sgd":  # DeepSpeed builds torch.optim.<type> for names it does not know
        return {
            "type": "SGD",
            "params": {"lr": t.lr, "momentum": t.sgd_momentum, "weight_decay": t.weight_decay},
        }
    return {
        "type": "AdamW",
        "params": {
            "lr": t.lr,
            "betas": [t.adam_beta1, t.adam_beta2],
            "eps": t.adam_eps,
            "weight_decay": t.weight_decay,
            # torch's AdamW, with its fused CUDA kernel on a GPU: no DeepSpeed op compiled at start
            # (DeepSpeed's FusedAdam is a JIT nvcc build that needs a compiler on every node).
            "torch_adam": True,
            **({"fused": True} if cuda else {}),
        },
    }


_OWNED_KEYS = ("optimizer", "scheduler")


# ZeRO++ (stage 3): quantized weights (qwZ), quantized gradients (qgZ), hierarchical partitioning (hpZ).
_ZERO_PP = ("zero_quantized_weights", "zero_quantized_gradients", "zero_quantized_nontrainable_weights")


def _check_zero_stage_knobs(cfg: Config, ds: dict[str, Any], stage: int, *, cuda: bool) -> None:
    """ZeRO++ knobs in the JSON pass through on a GPU at stage 3; DiLoCo islands need ZeRO 0-2 (their
    outer step works on each rank's fp32 master weights)."""
    zero = ds["zero_optimization"]
    quantized = [k for k in _ZERO_PP if zero.get(k)] + (
        ["zero_hpz_partition_size"] if int(zero.get("zero_hpz_partition_size", 1)) > 1 else []
    )
    if quantized and not cuda:
        raise ConfigError(
            f"ZeRO++ ({', '.join(quantized)} in '{cfg.deepspeed_config}') needs CUDA kernels and cannot run on CPU; "
            "remove them, or compress gradients with parallel.communication_data_type: bf16"
        )
    if quantized and stage != 3:
        raise ConfigError(
            f"ZeRO++ ({', '.join(quantized)} in '{cfg.deepspeed_config}') works at ZeRO stage 3 only (this is stage "
            f"{stage}); use configs/deepspeed/zero3.json or remove them"
        )
    if cfg.parallel.diloco.islands > 1 and stage == 3:
        raise ConfigError(
            "parallel.diloco islands need ZeRO stage 0, 1 or 2 inside each island (stage 3 shards the weights "
            "the outer step updates); use configs/deepspeed/zero1.json or zero2.json"
        )


def _conflicts(user: Any, derived: Any, path: str) -> list[str]:
    if isinstance(user, dict) and isinstance(derived, dict):
        out: list[str] = []
        for key, value in user.items():
            if key in derived:
                out += _conflicts(value, derived[key], f"{path}.{key}" if path else key)
        return out
    if user == "auto" or user == derived:
        return []
    return [f"{path} = {user!r} (ours: {derived!r})"]


def build_deepspeed_config(cfg: Config, world_size: int, *, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed dict: the user's JSON (ZeRO/offload knobs) merged with the values we derive."""
    validate_world(cfg, world_size)
    user: dict[str, Any] = {}
    if cfg.deepspeed_config is not None:
        try:
            user = json.loads(Path(cfg.deepspeed_config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed_config '{cfg.deepspeed_config}' is not valid JSON: {e}") from None
    for key in _OWNED_KEYS:
        if key in user:
            raise ConfigError(
                f"deepspeed_config '{cfg.deepspeed_config}' sets '{key}'; the optimizer and LR schedule come "
                "from the train.* settings: remove it from the JSON"
            )
    derived = _derived_deepspeed(cfg, world_size, cuda=cuda)
    problems = _conflicts(user, derived, "")
    if problems:
        raise ConfigError(
            f"deepspeed_config '{cfg.deepspeed_config}' conflicts with values derived from our config: "
            + "; ".join(problems)
            + ". Remove them from the JSON and set train.* (or parallel.communication_data_type) instead"
        )
    ds = _merge(user, derived)
    ds.setdefault("zero_optimization", {"stage": 0})
    offload = (ds["zero_optimization"].get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    if offload and cuda and cfg.train.optimizer == "adamw":
        # The optimizer steps on the CPU copy: DeepSpeedCPUAdam (a C++ op) is far faster there.
        ds["optimizer"]["params"] = {k: v for k, v in ds["optimizer"]["params"].items() if k != "fused"}
        ds["optimizer"]["params"]["torch_adam"] = False
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"zero_optimization.stage = {stage!r} in '{cfg.deepspeed_config}'; use 0, 1, 2 or 3"
        )
    if stage >= 2 and cfg.parallel.pipeline_model_parallel_size > 1:
        raise ConfigError(
            f"ZeRO stage {stage} ('{cfg.deepspeed_config}') is incompatible with pipeline parallelism "
            f"(pipeline_model_parallel_size = {cfg.parallel.pipeline_model_parallel_size}): use "
            "configs/deepspeed/zero1.json or zero0.json"
        )
    if stage == 3 and cfg.parallel.tensor_model_parallel_size > 1:
        raise ConfigError(
            "ZeRO stage 3 with tensor parallelism is not supported: use configs/deepspeed/zero1.json or "
            "zero2.json with parallel.tensor_model_parallel_size > 1"
        )
    _check_zero_stage_knobs(cfg, ds, stage, cuda=cuda)
    fp32 = resolve_precision(cfg.train.precision, cuda=cuda) == "fp32"
    if cfg.parallel.pipeline_model_parallel_size > 1 and stage == 0 and fp32:
        # DeepSpeed's fp32 clipping under pipeline parallelism miscounts the norm: llm's optimizer
        # (llm.training.optim.ClippedAdamW) clips instead; DeepSpeed gets no optimizer entry.
        del ds["optimizer"]
        ds["gradient_clipping"] = 0.0
    if cfg.parallel.pipeline_model_parallel_size > 1 and cfg.model.sequence_parallel:
        # DeepSpeed splits stage-boundary activations across the TP group assuming they are replicated
        # there; under sequence parallelism each TP rank holds a different sequence shard.
        ds["pipeline"] = {**ds.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    return ds
