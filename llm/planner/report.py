"""The planner's inputs from a config, and its table."""

from __future__ import annotations

import json
from pathlib import Path

from llm.config import Config, ConfigError, load_config
from llm.model.flops import active_params, total_params
from llm.planner.memory import GB, Layout, MemoryEstimate, ZeroBuffers, estimate_memory
from llm.planner.search import Candidate, Cluster


def config_vocab(cfg: Config) -> int:
    """model.vocab_size, else the tokenizer's size."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if cfg.data.tokenizer is None:
        raise ConfigError("set model.vocab_size or data.tokenizer so the vocabulary size is known")
    from llm.data.tokenizer import load_tokenizer

    return int(load_tokenizer(cfg.data.tokenizer).vocab_size)


def zero_settings(cfg: Config) -> dict:
    """The `zero_optimization` section of the config's DeepSpeed JSON ({} without one)."""
    if cfg.deepspeed_config is None:
        return {}
    try:
        user = json.loads(Path(cfg.deepspeed_config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed_config '{cfg.deepspeed_config}' cannot be read: {e}") from None
    return dict(user.get("zero_optimization", {}))


def zero_stage(cfg: Config) -> int:
    return int(zero_settings(cfg).get("stage", 0))


def config_layout(cfg: Config, world_size: int) -> Layout:
    """The layout a config runs at on `world_size` processes."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    cp = cfg.parallel.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
    return Layout(
        tp=tp, pp=pp, dp=world_size // (tp * pp * cp), zero=zero_stage(cfg), micro_batch_size=cfg.train.micro_batch_size,
        activation_checkpointing=cfg.model.activation_checkpointing, sequence_parallel=cfg.model.sequence_parallel,
        ep=cfg.parallel.expert_model_parallel_size, cp=cp,
    )  # fmt: skip


def _row(c: Candidate) -> str:
    m = c.memory
    act = m.activations / GB
    return (
        f"{c.layout.describe():<26} {m.params / 1e9:>7.2f}B {m.weights / GB:>7.1f} {m.gradients / GB:>7.1f} "
        f"{m.optimizer / GB:>7.1f} {act:>7.1f} {m.buffers / GB:>7.1f} {m.total / GB:>7.1f} {100 * c.bubble:>5.1f}% "
        f"{c.step_time:>8.2f}  {'yes' if c.fits else 'no'}"
    )


def format_table(
    cfg: Config, cluster: Cluster, cands: list[Candidate], *, vocab: int, top: int, precision: str
) -> str:
    m = cfg.model
    flops = cands[0].step_flops
    head = [
        f"model: {m.architecture}, {total_params(m, vocab) / 1e9:.2f}B parameters"
        + (f" ({active_params(m, vocab) / 1e9:.2f}B active: {m.num_experts} experts, top {m.moe_router_topk})"
           if m.is_moe else "")
        + f", {m.num_layers} layers x "
        f"{m.hidden_size}, seq {m.seq_length}; global batch {cfg.train.global_batch_size}; {precision}",
        f"cluster: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs, {cluster.gpu_memory_gb:g} GiB each "
        f"(fits: <= {100 * cluster.usable_fraction:.0f}%); step {flops / 1e15:.1f} PFLOP (model FLOPs)",
        f"{len(cands)} candidate layouts, {sum(c.fits for c in cands)} fit; memory per GPU in GiB (largest stage):",
        "",
        f"{'layout':<26} {'params':>8} {'weights':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'bufs':>7} {'total':>7} "
        f"{'bubble':>6} {'step s':>8}  fits",
    ]
    rows = [_row(c) for c in cands[:top]]
    pick = cands[0]
    tail = [""]
    if pick.fits:
        lay = pick.layout
        tail.append(
            f"recommended: {lay.describe()}: parallel.tensor_model_parallel_size={lay.tp} "
            f"parallel.pipeline_model_parallel_size={lay.pp} train.micro_batch_size={lay.micro_batch_size} "
            f"model.activation_checkpointing={str(lay.activation_checkpointing).lower()} "
            f"model.sequence_parallel={str(lay.sequence_parallel).lower()} "
            + (f"parallel.expert_model_parallel_size={lay.ep} " if cfg.model.is_moe else "")
            + f"parallel.context_parallel_size={lay.cp} "
            + f"deepspeed_config=configs/deepspeed/zero{lay.zero}.json"
        )
        tail.append(
            f"checkpoint.async_save=true would hold up to {pick.memory.async_save_host_bytes / GB:.1f} GiB of host "
            "memory per GPU while a save is written (a copy of the rank's weights and optimizer state)"
        )
    return "\n".join(head + rows + tail)


def estimate_for_run(run_dir: Path, *, precision: str) -> MemoryEstimate:
    """The estimate for a finished run: its effective config.yaml and layout.json. On CPU (fp32)
    only written pages count, as in resident memory."""
    cfg = load_config(run_dir / "config.yaml")
    world = int(json.loads((run_dir / "layout.json").read_text())["world_size"])
    return estimate_memory(
        cfg.model, config_layout(cfg, world), precision=precision, vocab=config_vocab(cfg),
        global_batch_size=cfg.train.global_batch_size, partition_method=cfg.parallel.pipeline_partition_method,
        zero_buffers=ZeroBuffers.from_json(zero_settings(cfg)), touched_only=precision == "fp32",
    )  # fmt: skip
