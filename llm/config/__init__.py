"""The typed configuration tree: one source of truth for a run.

- `schema`: the sections as dataclasses (Megatron's names), their choices and derived values;
- `loading`: YAML files, a checkpoint's copy and dotted overrides -> a validated Config (unknown keys
  are errors, Megatron's two data key names are accepted);
- `validation`: every number's range, shapes, parallel layouts, and the checks that need the world size.

The DeepSpeed config dict is derived from it in the DeepSpeed seam (`llm.engine.deepspeed_config`).
"""

from llm.config.loading import ALIASES, config_from_dict, load_config, parse_overrides, replace_validated
from llm.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DebugConfig,
    DilocoConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    SpikeDetectionConfig,
    TrainConfig,
    resolve_precision,
)
from llm.config.validation import fp8_layout_problem, parse_split, validate, validate_world

__all__ = [
    "ALIASES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DebugConfig", "DilocoConfig", "EvalConfig",
    "LoggingConfig", "ModelConfig", "ParallelConfig", "SpikeDetectionConfig", "TrainConfig", "config_from_dict", "fp8_layout_problem",
    "load_config", "parse_overrides", "parse_split", "replace_validated", "resolve_precision", "validate",
    "validate_world",
]  # fmt: skip
