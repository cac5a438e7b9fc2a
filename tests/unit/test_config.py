from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.config import ConfigError, load_config, validate_world
from llm.engine.deepspeed_config import build_deepspeed_config
from tests.conftest import REPO

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_and_dotted_overrides() -> None:
    cfg = load_config(None, ["model.num_layers=3", "train.lr=3e-4", "data.train_data_path=[0.5, a, 0.5, b]",
                             "model.tie_embeddings=false", "checkpoint.save_interval=null"])  # fmt: skip
    assert cfg.model.num_layers == 3
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.train_data_path == [0.5, "a", 0.5, "b"]
    assert cfg.model.tied is False and cfg.checkpoint.save_interval is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_layer=3"], "unknown config key 'model.num_layer' \\(did you mean 'num_layers'\\?\\)"),
        (["modle.x=1"], "unknown config key 'modle'"),
        (
            ["data.eod_mask_loss=true"],
            "data.eod_mask_loss needs the id of the end-of-document token: set data.tokenizer",
        ),
        (
            ["data.reset_position_ids=true", "data.eod_token_id=900", "model.vocab_size=800"],
            "data.eod_token_id = 900 is outside the vocabulary",
        ),
        (["model.num_layers=abc"], "model.num_layers: expected an integer"),
        (["model.architecture=bert"], "model.architecture = 'bert' is not valid"),
        (["model.hidden_size=100", "model.num_attention_heads=3"], "divisible by model.num_attention_heads"),
        (
            ["model.architecture=llama", "model.num_attention_heads=12", "model.num_query_groups=5"],
            "multiple of",
        ),
        (["model.num_query_groups=4"], "needs model.architecture: llama"),
        (["model.sequence_parallel=true"], "sequence_parallel needs"),
        (["parallel.tensor_model_parallel_size=5"], "num_attention_heads \\(12\\) must be divisible"),
        (
            ["parallel.pipeline_model_parallel_size=20", "model.num_layers=4"],
            "exceeds the number of pipeline layers",
        ),
        (
            ["model.architecture=llama", "model.num_query_groups=3", "parallel.tensor_model_parallel_size=2"],
            "must divide one another",
        ),
        (
            [
                "model.architecture=llama",
                "model.num_attention_heads=16",
                "model.hidden_size=64",
                "model.num_query_groups=1",
                "parallel.tensor_model_parallel_size=8",
            ],
            "head size \\(4\\) must be divisible",
        ),
        (
            ["parallel.tensor_model_parallel_size=4", "model.sequence_parallel=true", "model.seq_length=30"],
            "seq_length \\(30\\)",
        ),
        (["train.min_lr=1", "train.lr=0.1"], "train.min_lr"),
        (["train.precision=fp4"], "train.precision"),
        (["deepspeed_config=nope.json"], "does not exist"),
        (
            ["train.lr_warmup_iters=5000", "train.train_iters=100"],
            "^train.lr_warmup_iters = 5000 must not exceed train.train_iters = 100: lower train.lr_warmup_iters "
            "\\(e.g. train.lr_warmup_iters=10\\) or train longer$",
        ),
        (["train.skip_batches=[5-3]"], "train.skip_batches: '5-3' is not a range of batch numbers"),
        (["parallel.tensor_model_parallel_size=0"], "must be positive"),
        (["nosep"], "section.key=value"),
        (["train.lr=-1e-4"], "^train.lr = -0.0001 must be 0 or more$"),
        (["checkpoint.save_interval=-1"], "^checkpoint.save_interval = -1 must be positive$"),
        (["train.clip_grad=.nan"], "train.clip_grad: expected a finite number"),
        (["train.lr=[1"], "value of train.lr is not valid YAML"),
    ],
)
def test_invalid_settings_are_clear_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_or_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_world_size_checks() -> None:
    cfg = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=24"])
    validate_world(cfg, 3)
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size x data-parallel size"):
        validate_world(cfg, 4)


def test_deepspeed_dict_is_derived_and_merged(tmp_path: Path) -> None:
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "train_batch_size": "auto"})
    )
    cfg = load_config(None, [f"deepspeed_config={ds_json}", "train.global_batch_size=32", "train.micro_batch_size=4",
                             "train.clip_grad=0.5", "train.precision=bf16"])  # fmt: skip
    ds = build_deepspeed_config(cfg, 2, cuda=True)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True and params["fused"] is True
    cpu = build_deepspeed_config(load_config(None, ["deepspeed_config=configs/deepspeed/zero1.json"]), 1, cuda=False)
    assert not cpu["bf16"]["enabled"] and cpu["optimizer"]["params"]["torch_adam"] is True
    assert "fused" not in cpu["optimizer"]["params"]
    zero0 = build_deepspeed_config(load_config(None, []), 1, cuda=False)  # fp32 ZeRO 0: llm's optimizer clips
    assert "optimizer" not in zero0 and zero0["gradient_clipping"] == 0.0
    offload = build_deepspeed_config(load_config(None, ["deepspeed_config=configs/deepspeed/zero3_offload.json"]),
                                     1, cuda=True)  # fmt: skip
    assert (
        offload["optimizer"]["params"]["torch_adam"] is False
        and "fused" not in offload["optimizer"]["params"]
    )


@pytest.mark.parametrize(
    "user, message",
    [
        ({"train_batch_size": 64}, "train_batch_size = 64 \\(ours: 32\\)"),
        ({"gradient_clipping": 2.0}, "gradient_clipping"),
        ({"bf16": {"enabled": True}}, "bf16.enabled"),
        ({"optimizer": {"type": "Adam"}}, "sets 'optimizer'"),
        ({"scheduler": {"type": "WarmupLR"}}, "sets 'scheduler'"),
        ({"zero_optimization": {"stage": 5}}, "use 0, 1, 2 or 3"),
    ],
)
def test_deepspeed_conflicts_are_errors(tmp_path: Path, user: dict, message: str) -> None:
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps(user))
    cfg = load_config(
        None, [f"deepspeed_config={ds_json}", "train.global_batch_size=32", "train.precision=fp32"]
    )
    with pytest.raises(ConfigError, match=message):
        build_deepspeed_config(cfg, 1, cuda=False)


def test_invalid_deepspeed_json(tmp_path: Path) -> None:
    ds_json = tmp_path / "ds.json"
    ds_json.write_text("{bad")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_deepspeed_config(load_config(None, [f"deepspeed_config={ds_json}"]), 1, cuda=False)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    cfg.model.vocab_size = 8192
    tiny = path.name.startswith(("tiny_cpu", "tiny_moe_cpu"))  # CPU configs: one process (MoE: two)
    par = cfg.parallel  # GPU configs: the nodes of 8 GPUs their model parallelism and experts need
    needed = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    world = (2 if "moe" in path.name else 1) if tiny else 8 * -(-needed * par.expert_model_parallel_size // 8)
    ds = build_deepspeed_config(cfg, world, cuda=not tiny)
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert cfg.model.padded_vocab_size() % 128 == 0


def test_every_shipped_deepspeed_json_is_valid() -> None:
    files = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
    assert {f.stem for f in files} >= {"zero0", "zero1", "zero2", "zero3", "zero3_offload"}
    for f in files:
        cfg = load_config(None, [f"deepspeed_config={f}"])
        build_deepspeed_config(cfg, 1, cuda=False)


def test_fp16_on_cpu_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        build_deepspeed_config(load_config(None, ["train.precision=fp16"]), 1, cuda=False)
    ds = build_deepspeed_config(load_config(None, ["train.precision=fp16"]), 1, cuda=True)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_bf16_pipeline_at_zero0_is_refused_with_the_fix() -> None:
    """DeepSpeed runs bf16 pipelines at stage 0 through its flat bf16 optimizer with bf16 gradient
    accumulation; checkpoints written that way failed to save (found with train.precision: fp8)."""
    for precision in ("bf16", "fp8"):
        cfg = load_config(None, ["parallel.pipeline_model_parallel_size=2", f"train.precision={precision}",
                                 "debug.fp8_on_cpu=true", "train.global_batch_size=8", "train.micro_batch_size=1"])  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^bf16 \(train.precision: {precision}\) with pipeline parallelism needs "
                                              r"ZeRO stage 1 .*use configs/deepspeed/zero1.json"):  # fmt: skip
            build_deepspeed_config(cfg, 2, cuda=False)
    fp32 = load_config(None, ["parallel.pipeline_model_parallel_size=2", "train.precision=fp32",
                              "train.global_batch_size=8", "train.micro_batch_size=1"])  # fmt: skip
    assert build_deepspeed_config(fp32, 2, cuda=False)["zero_optimization"]["stage"] == 0


def test_zero2_with_pipeline_is_refused_with_the_fix() -> None:
    cfg = load_config(None, ["parallel.pipeline_model_parallel_size=2", "deepspeed_config=configs/deepspeed/zero2.json",
                             "train.global_batch_size=8", "train.micro_batch_size=1"])  # fmt: skip
    with pytest.raises(ConfigError, match="incompatible with pipeline parallelism.*zero1.json"):
        build_deepspeed_config(cfg, 2, cuda=False)
    ok = load_config(None, ["parallel.pipeline_model_parallel_size=2", "deepspeed_config=configs/deepspeed/zero1.json",
                            "train.global_batch_size=8", "train.micro_batch_size=1"])  # fmt: skip
    assert build_deepspeed_config(ok, 4, cuda=False)["gradient_accumulation_steps"] == 4


def test_megatron_data_key_names_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.data_path=0.3 /d/a 0.7 /d/b", "data.data_cache_path=/d/cache"])
    assert cfg.data.train_data_path == "0.3 /d/a 0.7 /d/b" and cfg.data.index_cache_dir == "/d/cache"
    (tmp_path / "c.yaml").write_text("data:\n  data_path: /d/a\n  train_data_path: /d/b\n")
    with pytest.raises(
        ConfigError, match="data.data_path is Megatron's name for data.train_data_path; set only one"
    ):
        load_config(tmp_path / "c.yaml")
    # An override by Megatron's name replaces the file's value by ours (every shipped config sets
    # data.train_data_path), and the other way round; null leaves the other name in charge.
    for config in [REPO / "configs" / "tiny_cpu.yaml", *sorted((REPO / "configs").glob("*/*.yaml"))]:
        assert load_config(config, ["data.data_path=/d/x"]).data.train_data_path == "/d/x", config
    assert (
        load_config(config, ["data.train_data_path=null", "data.data_path=/d/y"]).data.train_data_path
        == "/d/y"
    )
    (tmp_path / "m.yaml").write_text("data:\n  data_path: /d/a\n  data_cache_path: /d/c\n")
    cfg = load_config(tmp_path / "m.yaml", ["data.train_data_path=/d/b", "data.index_cache_dir=/d/e"])
    assert (cfg.data.train_data_path, cfg.data.index_cache_dir) == ("/d/b", "/d/e")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.diloco.islands=2", "parallel.diloco.inner_steps=4", "parallel.diloco.delay=4"],
         "parallel.diloco.delay \\(4\\) must be smaller than parallel.diloco.inner_steps \\(4\\)"),
        (["parallel.diloco.islands=2", "parallel.diloco.inner_steps=2", "parallel.diloco.fragments=3",
          "model.num_layers=4"], "fragments \\(3\\) exceeds parallel.diloco.inner_steps"),
        (["parallel.diloco.islands=2", "parallel.diloco.fragments=3", "model.num_layers=2"],
         "fragments \\(3\\) exceeds model.num_layers"),
        (["parallel.diloco.islands=3", "train.global_batch_size=32"], "multiple of parallel.diloco.islands \\(3\\)"),
        (["parallel.diloco.islands=2", "train.precision=fp16"], "fp16 is not supported"),
        (["parallel.diloco.outer_momentum=1"], "outer_momentum = 1.0 must lie in \\[0, 1\\)"),
        (["parallel.diloco.exchange=int2"], "parallel.diloco.exchange = 'int2' is not valid; choose one of fp32, bf16"),
        (["train.optimizer=lion"], "train.optimizer = 'lion' is not valid; choose one of adamw, sgd"),
    ],
)  # fmt: skip
def test_invalid_diloco_settings_are_clear_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_islands_split_the_world_and_the_global_batch() -> None:
    cfg = load_config(None, ["parallel.diloco.islands=2", "parallel.tensor_model_parallel_size=2",
                             "train.global_batch_size=16", "train.micro_batch_size=2"])  # fmt: skip
    ds = build_deepspeed_config(cfg, 8, cuda=False)  # 2 islands x TP 2 x DP 2
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2  # DeepSpeed sees one island
    with pytest.raises(ConfigError, match="not divisible by islands x TP x PP = 2 x 2 x 1"):
        validate_world(cfg, 6)
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel size x islands \\(4 x 2\\)"):
        validate_world(load_config(None, ["parallel.diloco.islands=2", "train.global_batch_size=24",
                                          "train.micro_batch_size=2"]), 8)  # fmt: skip
    with pytest.raises(ConfigError, match="ZeRO stage 0, 1 or 2 inside each island"):
        build_deepspeed_config(load_config(None, ["parallel.diloco.islands=2",
                                                  "deepspeed_config=configs/deepspeed/zero3.json"]), 2, cuda=False)  # fmt: skip


def test_compressed_communication_settings(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["parallel.communication_data_type=bf16", "train.optimizer=sgd", "train.sgd_momentum=0.9",
               "deepspeed_config=configs/deepspeed/zero1.json"],
    )  # fmt: skip
    ds = build_deepspeed_config(cfg, 2, cuda=False)
    assert ds["communication_data_type"] == "bf16"
    assert ds["optimizer"] == {
        "type": "SGD",
        "params": {"lr": cfg.train.lr, "momentum": 0.9, "weight_decay": 0.1},
    }
    zpp = tmp_path / "zpp.json"
    zpp.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True,
                                                     "zero_hpz_partition_size": 8}}))  # fmt: skip
    with_zpp = load_config(None, [f"deepspeed_config={zpp}"])
    with pytest.raises(ConfigError, match="ZeRO\\+\\+ \\(zero_quantized_gradients, zero_hpz_partition_size in .*\\) "
                                          "needs CUDA kernels and cannot run on CPU"):  # fmt: skip
        build_deepspeed_config(with_zpp, 8, cuda=False)
    assert (
        build_deepspeed_config(with_zpp, 8, cuda=True)["zero_optimization"]["zero_quantized_gradients"]
        is True
    )
    zpp.write_text(json.dumps({"zero_optimization": {"stage": 2, "zero_quantized_weights": True}}))
    with pytest.raises(ConfigError, match="works at ZeRO stage 3 only \\(this is stage 2\\)"):
        build_deepspeed_config(load_config(None, [f"deepspeed_config={zpp}"]), 8, cuda=True)


@pytest.mark.parametrize(
    ("overrides", "cuda", "expected"),
    [
        # pipeline, ZeRO 0, fp32: DeepSpeed's clipping miscounts the norm, llm's optimizer clips and reports it
        (["parallel.pipeline_model_parallel_size=2"], False, ("fp32", 0, True, "llm", "llm_optimizer")),
        # no pipeline, ZeRO 0, fp32: DeepSpeed's clipping reports no norm (it was computed twice); llm's
        # optimizer clips once and reports it
        ([], False, ("fp32", 0, False, "llm", "llm_optimizer")),
        (
            ["deepspeed_config=configs/deepspeed/zero1.json"],
            False,
            ("fp32", 1, False, "deepspeed", "deepspeed"),
        ),
        (
            ["parallel.pipeline_model_parallel_size=2", "deepspeed_config=configs/deepspeed/zero1.json"],
            True,
            ("bf16", 1, True, "deepspeed", "deepspeed"),
        ),
    ],
)
def test_the_optimizer_plan_decides_who_builds_clips_and_reports(
    overrides: list[str], cuda: bool, expected: tuple
) -> None:
    from llm.engine.deepspeed_config import deepspeed_setup

    cfg = load_config(None, ["model.num_layers=4", *overrides])
    ds, plan = deepspeed_setup(cfg, 2, cuda=cuda)
    assert (
        plan.precision,
        plan.zero_stage,
        plan.pipeline,
        plan.optimizer_from,
        plan.grad_norm_from,
    ) == expected
    assert plan.clipped_by == plan.optimizer_from
    # the DeepSpeed dict says the same: no optimizer entry and no clipping where llm's optimizer clips
    assert ("optimizer" in ds) == (plan.optimizer_from == "deepspeed")
    assert (ds["gradient_clipping"] == 0.0) == (plan.optimizer_from == "llm")
    assert ds == build_deepspeed_config(cfg, 2, cuda=cuda)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["train.rampup_batch_size=[8, 8]"], 1, r"give \[start, increment, samples\]"),
        (["train.rampup_batch_size=[8, 0, 100]"], 1, "must be positive"),
        (["train.rampup_batch_size=[32, 8, 100]"], 1, r"start must be smaller and \(32 - 32\)"),
        (["train.rampup_batch_size=[8, 16, 100]"], 1, r"\(32 - 8\) a multiple of 16"),
        (
            ["train.rampup_batch_size=[4, 4, 100]"],
            2,
            r"multiples of train.micro_batch_size x the data-parallel ranks \(8\)",
        ),
        (
            ["train.lr_decay_style=WSD", "train.lr_wsd_decay_iters=95", "train.lr_warmup_iters=10"],
            1,
            r"WSD's decay phase \(95 iterations\) is longer than the iterations after the warmup \(100 - 10\)",
        ),
        (["train.lr_wsd_decay_fraction=0"], 1, r"train.lr_wsd_decay_fraction = 0.0 must lie in \(0, 1\]"),
        (["train.lr_wsd_decay_style=sqrt"], 1, "choose one of linear, cosine, exponential, minus_sqrt"),
    ],
)
def test_wsd_and_rampup_mistakes_name_the_setting(overrides: list[str], world: int, message: str) -> None:
    base = ["train.global_batch_size=32", "train.micro_batch_size=4", "train.train_iters=100"]
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(None, [*base, *overrides])
        validate_world(cfg, world)


def test_muon_outside_zero0_fp32_is_refused_with_the_fix() -> None:
    from llm.engine.deepspeed_config import deepspeed_setup

    with pytest.raises(ConfigError, match=r"muon runs at ZeRO stage 0 in fp32 \(this run: stage 1, fp32\).*zero0.json"):
        deepspeed_setup(load_config(None, ["train.optimizer=muon", "deepspeed_config=configs/deepspeed/zero1.json"]), 1, cuda=False)
    with pytest.raises(ConfigError, match=r"\(this run: stage 0, bf16\).*train.precision: fp32"):
        deepspeed_setup(load_config(None, ["train.optimizer=muon"]), 1, cuda=True)  # auto = bf16 on a GPU
    _, plan = deepspeed_setup(load_config(None, ["train.optimizer=muon", "train.precision=fp32"]), 1, cuda=True)
    assert (plan.optimizer_from, plan.grad_norm_from) == ("llm", "llm_optimizer")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.context_parallel_size=2", "model.seq_length=30"],
         r"seq_length \(30\) must be divisible by 2 x parallel.context_parallel_size \(4\)"),
        (["parallel.context_parallel_size=8", "parallel.cp_comm_type=a2a", "model.seq_length=64"],
         r"a2a needs model.num_attention_heads \(12\) and the KV groups \(12\) divisible by TP x CP \(1 x 8\)"),
        (["parallel.context_parallel_size=2", "model.attention_dropout=0.1"], "attention_dropout with"),
        (["parallel.cp_comm_type=ring"], "choose one of p2p, a2a"),
    ],
)  # fmt: skip
def test_context_parallel_mistakes_name_the_setting(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_context_parallel_at_zero3_takes_the_reduce_scatter_and_scales_the_gradient() -> None:
    """ZeRO 3 divides CP ranks' gradient parts by DP x CP on its reduce-scatter path (by DP on the other):
    the reduce-scatter is chosen and the loss's gradient scaled by CP; a JSON that turns it off is refused."""
    from llm.engine.deepspeed_config import deepspeed_setup

    cfg = load_config(None, ["parallel.context_parallel_size=2", "deepspeed_config=configs/deepspeed/zero3.json"])
    ds, plan = deepspeed_setup(cfg, 2, cuda=False)
    assert (ds["zero_optimization"]["reduce_scatter"], plan.cp_grad_factor) == (True, 2)
    ds, plan = deepspeed_setup(load_config(None, ["deepspeed_config=configs/deepspeed/zero3.json"]), 2, cuda=False)
    assert plan.cp_grad_factor == 1


def test_zero3_without_reduce_scatter_under_context_parallelism_is_refused(tmp_path: Path) -> None:
    from llm.engine.deepspeed_config import deepspeed_setup

    cfg_json = tmp_path / "z3.json"
    cfg_json.write_text('{"zero_optimization": {"stage": 3, "reduce_scatter": false}}')
    cfg = load_config(None, ["parallel.context_parallel_size=2", f"deepspeed_config={cfg_json}"])
    with pytest.raises(ConfigError, match="reduce_scatter: false .* context parallelism .* remove it"):
        deepspeed_setup(cfg, 2, cuda=False)


def test_under_pipeline_and_context_parallelism_deepspeed_counts_cp_times_the_batch() -> None:
    """DeepSpeed's pipeline data axis is DP x CP (engine.pipeline_grid): its batch is CP x the samples,
    so that its accumulation steps stay ours; the loss's gradient is scaled by CP."""
    from llm.engine.deepspeed_config import deepspeed_setup

    over = ["parallel.context_parallel_size=2", "train.global_batch_size=16", "train.micro_batch_size=2"]
    ds, plan = deepspeed_setup(load_config(None, [*over, "parallel.pipeline_model_parallel_size=2"]), 8, cuda=False)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], plan.cp_grad_factor) == (32, 4, 2)
    ds, plan = deepspeed_setup(load_config(None, over), 4, cuda=False)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], plan.cp_grad_factor) == (16, 4, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["logging.profile_step_start=3"], "profile_step_start and logging.profile_step_end go together"),
        (["logging.profile_step_start=5", "logging.profile_step_end=4"], r"profile_step_end \(4\) is before"),
        (["logging.profile_step_start=0", "logging.profile_step_end=1"], "logging.profile_step_start = 0 must be positive"),
        (["logging.profile_ranks=[-1]"], "must be a list of ranks"),
    ],
)
def test_profile_mistakes_name_the_setting(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_chunked_loss_with_pipeline_parallelism_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="loss_chunk_tokens with parallel.pipeline_model_parallel_size > 1"):
        load_config(None, ["model.loss_chunk_tokens=1024", "parallel.pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens = 0 must be positive"):
        load_config(None, ["model.loss_chunk_tokens=0"])
