"""The checkpoint layer's cheap parts: configs read back from checkpoints, the DeepSpeed version
gate, and the one error base class."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.checkpoint.format import CheckpointError, config_from_meta, read_meta, write_meta
from llm.config import Config, ConfigError, load_config
from llm.engine.compat import TESTED_DEEPSPEED, UntestedDeepSpeedError, require_tested_deepspeed
from llm.errors import LLMError


def test_a_config_read_back_from_a_checkpoint_is_validated(tmp_path: Path) -> None:
    good = Config().to_dict()
    write_meta(tmp_path, {"iteration": 3, "config": good})
    assert config_from_meta(read_meta(tmp_path)) == Config()
    bad = Config().to_dict()
    bad["model"]["num_attention_heads"] = 7  # 768 is not divisible by 7
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        config_from_meta({"config": bad})
    bad = Config().to_dict()
    bad["train"]["precision"] = "fp4"
    with pytest.raises(CheckpointError, match="train.precision"):
        config_from_meta({"config": bad})


def test_an_untested_deepspeed_is_refused_with_the_tested_range(monkeypatch: pytest.MonkeyPatch) -> None:
    require_tested_deepspeed()  # the installed one is a tested one
    monkeypatch.delenv("LLM_ALLOW_UNTESTED_DEEPSPEED", raising=False)
    with pytest.raises(UntestedDeepSpeedError, match=TESTED_DEEPSPEED[-1].replace(".", r"\.")):
        require_tested_deepspeed("0.14.0")
    monkeypatch.setenv("LLM_ALLOW_UNTESTED_DEEPSPEED", "1")
    require_tested_deepspeed("0.14.0")  # a warning only


def test_every_user_error_is_an_llm_error() -> None:
    from llm.checkpoint.reshard import ReshardError
    from llm.data.gpt_dataset import DatasetTooSmallError
    from llm.data.indexed_dataset import IndexedDatasetError
    from llm.data.loader import DataConfigError
    from llm.data.preprocess import StrictModeError
    from llm.data.sources import InputError
    from llm.data.tokenizer import TokenizerError
    from llm.export.tokenizer import TokenizerExportError
    from llm.parallel.launcher import LaunchError
    from llm.training.trainer import TrainingError

    for cls in (ConfigError, CheckpointError, ReshardError, DatasetTooSmallError, IndexedDatasetError,
                DataConfigError, StrictModeError, InputError, TokenizerError, TokenizerExportError, LaunchError,
                TrainingError, UntestedDeepSpeedError):  # fmt: skip
        assert issubclass(cls, LLMError), cls


def test_no_system_exit_inside_llm() -> None:
    import ast

    root = Path(__file__).resolve().parents[2] / "llm"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = (
                node.id
                if isinstance(node, ast.Name)
                else node.attr
                if isinstance(node, ast.Attribute)
                else ""
            )
            if name in ("SystemExit", "exit", "_exit"):
                offenders.append(f"{path}:{node.lineno}")
    assert offenders == []


def test_a_yaml_file_whose_top_level_is_not_a_mapping_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
