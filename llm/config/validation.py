"""Validation of a config tree: ranges of every number, model shapes, parallel layouts, DiLoCo,
lm-eval during training, document-aware training, fault injection; `validate_world` once the
number of processes is known. Every message names the setting and the fix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llm.config.schema import Config, ConfigError, ModelConfig


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
    "fraction>0": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
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
    "model.num_experts": "positive",
    "model.loss_chunk_tokens": "positive",
    "model.moe_router_topk": "positive",
    "model.moe_ffn_hidden_size": "positive",
    "model.moe_shared_expert_intermediate_size": "positive",
    "model.moe_aux_loss_coeff": "non-negative",
    "model.moe_z_loss_coeff": "non-negative",
    "model.moe_router_bias_update_rate": "non-negative",
    "model.moe_expert_capacity_factor": "positive",
    "parallel.expert_model_parallel_size": "positive",
    "parallel.context_parallel_size": "positive",
    "train.train_iters": "positive",
    "train.micro_batch_size": "positive",
    "train.global_batch_size": "positive",
    "train.lr": "non-negative",
    "train.min_lr": "non-negative",
    "train.lr_warmup_iters": "non-negative",
    "train.lr_decay_iters": "positive",
    "train.lr_wsd_decay_iters": "positive",
    "train.lr_wsd_decay_fraction": "fraction>0",
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
    "train.muon_lr": "non-negative",
    "train.muon_momentum": "fraction",
    "train.muon_ns_steps": "positive",
    "eval.eval_interval": "positive",
    "logging.profile_step_start": "positive",
    "logging.profile_step_end": "positive",
    "eval.eval_iters": "non-negative",
    "eval.lm_eval_interval": "positive",
    "eval.lm_eval_limit": "positive",
    "eval.lm_eval_num_fewshot": "non-negative",
    "logging.log_interval": "positive",
    "checkpoint.save_interval": "positive",
    "checkpoint.keep_last": "positive",
    "debug.checkpoint_write_delay_seconds": "non-negative",
    "debug.checkpoint_copy_delay_seconds": "non-negative",
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
        raise ConfigError(
            f"model.parallel_block_norms = {m.parallel_block_norms}: use 1 (GPT-J, PaLM) or 2 (GPT-NeoX)"
        )
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


def _check_moe(cfg: Config) -> None:
    m, ep = cfg.model, cfg.parallel.expert_model_parallel_size
    if m.num_experts is None:
        if ep > 1:
            raise ConfigError("parallel.expert_model_parallel_size > 1 needs a mixture of experts: set model.num_experts")
        return
    if m.moe_router_topk > m.num_experts:
        raise ConfigError(
            f"model.moe_router_topk ({m.moe_router_topk}) exceeds model.num_experts ({m.num_experts}): "
            "a token cannot choose more experts than there are"
        )
    if m.num_experts % ep:
        raise ConfigError(
            f"model.num_experts ({m.num_experts}) must be divisible by parallel.expert_model_parallel_size ({ep}): "
            "every expert-parallel rank holds the same number of experts"
        )
    freq = m.moe_layer_freq
    if isinstance(freq, bool) or not isinstance(freq, (int, list)):
        raise ConfigError(f"model.moe_layer_freq = {freq!r}: give a positive integer k or a list of 0/1 per block")
    if isinstance(freq, int) and freq < 1:
        raise ConfigError(f"model.moe_layer_freq = {freq} must be at least 1 (1: every block is MoE)")
    if isinstance(freq, list) and (
        len(freq) != m.num_layers or any(f not in (0, 1) or isinstance(f, bool) for f in freq) or not any(freq)
    ):
        raise ConfigError(
            f"model.moe_layer_freq = {freq}: a list needs one 0 (dense) or 1 (MoE) per block "
            f"(model.num_layers = {m.num_layers}), with at least one 1"
        )
    unsupported = [
        (cfg.parallel.tensor_model_parallel_size > 1 and m.parallel_block,
         "model.parallel_block and parallel.tensor_model_parallel_size > 1"),
        (cfg.parallel.diloco.islands > 1, "parallel.diloco.islands > 1"),
        (cfg.train.precision == "fp16", "train.precision: fp16 (use bf16 or fp32)"),
        (cfg.train.optimizer == "muon", "train.optimizer: muon (use adamw)"),
    ]
    tp, cp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.context_parallel_size
    if tp > 1 and m.seq_length % (tp * cp):
        raise ConfigError(
            f"model.seq_length ({m.seq_length}) must be divisible by parallel.tensor_model_parallel_size ({tp})"
            + (f" x context_parallel_size ({cp})" if cp > 1 else "")
            + " for a mixture of experts: each TP rank routes its share of every sequence"
        )
    for bad, what in unsupported:
        if bad:
            raise ConfigError(f"model.num_experts (a mixture of experts) with {what} is not supported yet")


def check_context_parallel(m: ModelConfig, *, cp: int, tp: int, comm: str) -> None:
    """What a context-parallel model needs: every rank two equal chunks of the sequence; Ulysses
    (a2a) splits the (local) query heads and KV groups over the CP ranks."""
    if cp == 1:
        return
    if m.seq_length % (2 * cp):
        raise ConfigError(
            f"model.seq_length ({m.seq_length}) must be divisible by 2 x parallel.context_parallel_size ({2 * cp}): "
            "each rank holds two equal chunks of the sequence (the causal load balance)"
        )
    if comm == "a2a" and (m.num_attention_heads % (tp * cp) or m.kv_groups % (tp * cp)):
        raise ConfigError(
            f"parallel.cp_comm_type: a2a needs model.num_attention_heads ({m.num_attention_heads}) and the KV groups "
            f"({m.kv_groups}) divisible by TP x CP ({tp} x {cp}); use cp_comm_type: p2p or a smaller CP"
        )
    if m.attention_dropout > 0:
        raise ConfigError("model.attention_dropout with parallel.context_parallel_size > 1 is not supported; set it to 0")


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
    if tasks and (
        cfg.parallel.tensor_model_parallel_size > 1 or cfg.parallel.pipeline_model_parallel_size > 1
    ):
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
    if (
        d.eod_token_id is not None
        and cfg.model.vocab_size is not None
        and d.eod_token_id >= cfg.model.vocab_size
    ):
        raise ConfigError(
            f"data.eod_token_id = {d.eod_token_id} is outside the vocabulary (model.vocab_size = {cfg.model.vocab_size})"
        )


def _check_loss_chunks(cfg: Config) -> None:
    if cfg.model.loss_chunk_tokens and cfg.parallel.pipeline_model_parallel_size > 1:
        raise ConfigError(
            "model.loss_chunk_tokens with parallel.pipeline_model_parallel_size > 1 is not supported: the LM head "
            "is a pipeline layer of its own there; leave model.loss_chunk_tokens unset"
        )


def _check_profile(cfg: Config) -> None:
    log = cfg.logging
    start, end = log.profile_step_start, log.profile_step_end
    if (start is None) != (end is None):
        raise ConfigError(
            "logging.profile_step_start and logging.profile_step_end go together: set both (the first and last "
            "iteration profiled) or neither"
        )
    if start is not None and end is not None and end < start:
        raise ConfigError(f"logging.profile_step_end ({end}) is before logging.profile_step_start ({start})")
    if not isinstance(log.profile_ranks, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in log.profile_ranks
    ):
        raise ConfigError(f"logging.profile_ranks: {log.profile_ranks!r} must be a list of ranks (integers from 0)")


def _check_faults(cfg: Config) -> None:
    bad = [
        x for x in cfg.debug.inject_loss_spike_at if not isinstance(x, int) or isinstance(x, bool) or x < 1
    ]
    if bad:
        raise ConfigError(f"debug.inject_loss_spike_at: {bad} are not iterations (positive integers)")


def validate(cfg: Config) -> None:
    """Checks everything that can be checked without knowing the world size."""
    _check_ranges(cfg)
    _check_documents(cfg)
    _check_faults(cfg)
    _check_profile(cfg)
    _check_loss_chunks(cfg)
    _check_lm_eval(cfg)
    _check_model(cfg.model)
    _check_parallel(cfg)
    _check_moe(cfg)
    _check_fp8(cfg)  # after the TP and MoE checks: it divides the layers' shapes by the TP size
    p = cfg.parallel
    check_context_parallel(cfg.model, cp=p.context_parallel_size, tp=p.tensor_model_parallel_size, comm=p.cp_comm_type)
    _check_diloco(cfg)
    try:
        cfg.train.skip_ranges  # noqa: B018 (parsed for its error)
    except ValueError as e:
        raise ConfigError(
            f"train.skip_batches: '{e}' is not a range of batch numbers like '120-135' (or one number, 1 or more)"
        ) from None
    _check_schedule(cfg)
    if cfg.train.lr_warmup_iters > cfg.train.decay_iters:
        t = cfg.train
        decay = (
            f"train.lr_decay_iters = {t.lr_decay_iters}"
            if t.lr_decay_iters
            else f"train.train_iters = {t.train_iters}"
        )
        raise ConfigError(
            f"train.lr_warmup_iters = {t.lr_warmup_iters} must not exceed {decay}: lower train.lr_warmup_iters "
            f"(e.g. train.lr_warmup_iters={max(t.decay_iters // 10, 0)}) or train longer"
        )
    if cfg.deepspeed_config is not None and not Path(cfg.deepspeed_config).is_file():
        raise ConfigError(
            f"deepspeed_config '{cfg.deepspeed_config}' does not exist; use one of configs/deepspeed/*.json"
        )


def _check_fp8(cfg: Config) -> None:
    if cfg.train.precision != "fp8":
        return
    p = cfg.parallel
    problem = fp8_layout_problem(cfg.model, tp=p.tensor_model_parallel_size, cp=p.context_parallel_size,
                                 micro_batch_size=cfg.train.micro_batch_size)  # fmt: skip
    if problem:
        raise ConfigError(problem)


def _fp8_layers(m: ModelConfig, tp: int) -> list[tuple[str, int, int]]:
    """The linear layers train.precision: fp8 runs in float8 (llm.parallel.layers.use_fp8), with the
    rows and columns of each one's weight on a tensor-parallel rank of `tp`."""
    h, d, k = m.hidden_size, m.head_dim, 2 if m.is_llama else 1  # k: SwiGLU's fc holds gate and up
    layers = [("the attention's QKV projection", (m.num_attention_heads + 2 * m.kv_groups) * d // tp, h),
              ("the attention's output projection", h, m.num_attention_heads * d // tp)]  # fmt: skip
    mlps = [("the MLP's", m.ffn_size, tp)] if len(m.moe_layers) < m.num_layers else []
    if m.is_moe:
        mlps.append(("the routed experts'", m.moe_ffn_size, 1))  # whole on every TP rank
        if m.moe_shared_expert_intermediate_size:
            mlps.append(("the shared experts'", m.moe_shared_expert_intermediate_size, tp))
    for whose, f, split in mlps:
        layers += [(f"{whose} first layer", k * f // split, h), (f"{whose} projection", h, f // split)]
    return layers


def fp8_layout_problem(m: ModelConfig, *, tp: int, cp: int, micro_batch_size: int) -> str | None:
    """Why train.precision: fp8 cannot run this model at this layout, or None. FP8 GEMMs need every
    dimension they multiply over in multiples of 16: each float8 layer's weight on a rank, and the
    tokens a rank holds per micro-batch (the weight gradient multiplies over them); and whole KV groups
    on each TP rank. One rule for the config check and the planner (llm.planner.search); the layers
    check their own weights again when switched (llm.parallel.layers.use_fp8)."""
    if m.kv_groups % tp:
        return (
            f"train.precision: fp8 needs whole KV groups on each tensor-parallel rank (model.num_query_groups = "
            f"{m.kv_groups} divisible by parallel.tensor_model_parallel_size = {tp}): where ranks share a group, each "
            "holds a partial sum of its K/V gradient, which float8 would round unlike one process; use a TP size that "
            "divides the query groups, or train.precision: bf16"
        )
    tokens = micro_batch_size * m.seq_length // cp
    if tokens % 16:
        return (
            "train.precision: fp8 needs each rank's tokens per micro-batch (train.micro_batch_size x model.seq_length"
            + (" / parallel.context_parallel_size" if cp > 1 else "")
            + f" = {tokens}) to be a multiple of 16 (FP8 GEMMs): change model.seq_length or train.micro_batch_size"
        )
    for name, rows, cols in _fp8_layers(m, tp):
        if rows % 16 or cols % 16:
            return (
                f"train.precision: fp8 needs the linear layers' dimensions in multiples of 16 (FP8 GEMMs): {name}"
                f" is {rows} x {cols} on each tensor-parallel rank; choose model.hidden_size, model.ffn_hidden_size "
                "and model.num_attention_heads (with experts also model.moe_ffn_hidden_size and "
                "model.moe_shared_expert_intermediate_size) so that each rank's share is a multiple of 16, or use "
                "train.precision: bf16"
            )
    return None


def _check_schedule(cfg: Config) -> None:
    """WSD's decay phase fits after the warmup; a batch ramp-up is [start, increment, samples] that
    reaches train.global_batch_size in whole increments."""
    t = cfg.train
    if t.lr_decay_style == "WSD" and t.wsd_decay_iters > t.decay_iters - t.lr_warmup_iters:
        raise ConfigError(
            f"WSD's decay phase ({t.wsd_decay_iters} iterations) is longer than the iterations after the warmup "
            f"({t.decay_iters} - {t.lr_warmup_iters}): lower train.lr_wsd_decay_iters or train.lr_wsd_decay_fraction, "
            "or raise train.train_iters"
        )
    r = t.rampup_batch_size
    if r is None:
        return
    if len(r) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
        raise ConfigError(
            f"train.rampup_batch_size = {r!r}: give [start, increment, samples], three integers"
        )
    start, increment, samples = r
    if start <= 0 or increment <= 0 or samples <= 0:
        raise ConfigError(f"train.rampup_batch_size = {r}: start, increment and samples must be positive")
    if start >= t.global_batch_size or (t.global_batch_size - start) % increment:
        raise ConfigError(
            f"train.rampup_batch_size = {r} does not ramp up to train.global_batch_size ({t.global_batch_size}) in "
            f"whole increments: start must be smaller and ({t.global_batch_size} - {start}) a multiple of {increment}"
        )


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of processes."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    islands = cfg.parallel.diloco.islands
    cp = cfg.parallel.context_parallel_size
    if world_size % (tp * pp * islands * cp):
        what = f"islands x TP x PP = {islands} x {tp} x {pp}" if islands > 1 else f"TP x PP = {tp} x {pp}"
        what += f" x CP {cp}" if cp > 1 else ""
        raise ConfigError(f"world size {world_size} is not divisible by {what}")
    ep = cfg.parallel.expert_model_parallel_size
    if cfg.data_parallel_size(world_size) % ep:
        raise ConfigError(
            f"parallel.expert_model_parallel_size ({ep}) must divide the data-parallel size "
            f"({cfg.data_parallel_size(world_size)}): experts are spread over data-parallel ranks"
        )
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
    ramp = cfg.train.rampup_batch_size
    if ramp and (ramp[0] % per_step or ramp[1] % per_step):
        raise ConfigError(
            f"train.rampup_batch_size = {ramp}: start and increment must be multiples of train.micro_batch_size x "
            f"the data-parallel ranks ({per_step}), so that every step's batch splits into whole micro-batches"
        )
