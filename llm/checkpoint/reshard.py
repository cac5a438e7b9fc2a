"""Resume at another parallel layout: DeepSpeed's files of any TP x PP x DP and ZeRO stage ->
full per-parameter state -> the shards of the running layout.

How it works (automatic in `load_checkpoint` when the layout differs):

1. At save time every rank writes `layout/rank_NNNNN.json` (engine.py): its TP/PP/DP coordinates,
   the names of its DeepSpeed model and optimizer files, its optimizer's parameter order by name,
   and how each parameter it holds is split (the `partition_info` of the live parameter).
2. On resume, rank 0 converts the checkpoint once into `universal/` next to DeepSpeed's files: one
   file per plain-model parameter name holding the full fp32 weight and the full AdamW moments
   (`exp_avg`, `exp_avg_sq`), plus `universal/state.pt` (optimizer step, LR scheduler, counters).
   The conversion reads one pipeline stage's files at a time; it writes under a temporary name
   and renames, so a killed conversion is redone, never half-read.
   A Hugging Face import writes the same form through the same writer (`write_universal`), with
   weights only: the optimizer then starts fresh.
3. Every rank then reads only the parameters it holds, cuts its tensor-parallel shard with the
   split of its live parameter (`shard_by_spec`), and sets weights and moments through
   DeepSpeed's fragment API (ZeRO 1/2/3) or the torch optimizer's state (ZeRO 0).

Where DeepSpeed keeps AdamW's state (verified on DeepSpeed 0.19):
- ZeRO 0: `mp_rank_XX_model_states.pt["optimizer"]`, a torch state dict indexed by parameter
  position in the optimizer's groups (names from our layout file).
- ZeRO 1/2: `zero_pp_rank_D_mp_rank_XX_optim_states.pt`: per group a flat fp32 partition of this
  DP rank, with `param_slice_mappings` (name -> start, numel) and the base optimizer's flat state.
  Partitions are contiguous, so a parameter is its fragments in DP-rank order.
- ZeRO 3: every parameter is split into DP equal pieces (the last padded); the flat partition of
  a rank is its pieces in parameter order (`param_shapes`).
"""

from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint import writer
from llm.checkpoint.format import (
    UNIVERSAL_DIR,
    CheckpointError,
    parameter_specs,
    read_shard_maps,
)
from llm.checkpoint.merge import fit_vocab_rows, load_model_state, load_tensor_file
from llm.config import Config
from llm.engine.internals import create_flat_optimizer_state, fp32_masters, set_step_counters, torch_optimizer
from llm.engine.zero import gathered_for_write, set_full_fp32_param, set_full_optimizer_state
from llm.model.names import canonical_name
from llm.parallel.layers import merge_by_spec, partition_info, shard_by_spec
from llm.progress import Progress

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's, the only ones ZeRO 1-3 hold here
STATE_KEYS = (*MOMENTS, "momentum_buffer")  # and Muon's (ZeRO 0)
STATE_FILE = "state.pt"
Tensors = dict[str, torch.Tensor]


class ReshardError(CheckpointError):
    """A checkpoint that cannot be converted to another layout; the message names the file and fix."""


# ----------------------------------------------------------------------------- the writer


def write_universal(
    tag_dir: Path, entries: Iterable[tuple[str, Tensors]], state: dict[str, Any], *, total: int | None = None,
    durable: bool = False,
) -> Path:
    """Writes `tag_dir/universal/`: one file per plain-model parameter ({"fp32": full weight, and the
    AdamW moments when known}) and `state.pt`: `state` ({"step", "lr_scheduler", "global_steps",
    "global_samples"}), read after the last entry (a conversion learns the step while reading).
    Written under a temporary name and renamed, so a killed writer leaves nothing that looks complete.
    `durable` (an import, whose MANIFEST lists these files): each file flushed to disk as it is
    written, and its description recorded for the MANIFEST (writer.take_recorded)."""
    out = tag_dir / UNIVERSAL_DIR
    tmp = tag_dir / f"{UNIVERSAL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written: dict[str, dict[str, Any]] = {}
    with Progress(total, f"writing {out}", unit="tensors") as progress:
        for name, entry in entries:
            if "fp32" not in entry:
                raise ReshardError(f"no weight for parameter '{name}' while writing '{out}'")
            file = f"{name}.pt"
            written[file] = writer.write({k: v.float().contiguous() for k, v in entry.items()}, tmp / file,
                                         durable=durable)  # fmt: skip
            progress.update()
        written[STATE_FILE] = writer.write(
            {"step": 0.0, "lr_scheduler": None, "global_steps": 0, "global_samples": 0, **state}, tmp / STATE_FILE,
            durable=durable,
        )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if durable:  # renaming the directory keeps each file's identity (writer.record)
        for file, description in written.items():
            writer.record(out / file, description)
    return out


# ----------------------------------------------------------------------------- convert


def _shard_state_zero0(
    tag_dir: Path, info: dict[str, Any], *, trust: bool
) -> tuple[dict[str, Tensors], dict[str, Any]]:
    """ZeRO 0: moments of one (PP, TP) shard from the torch state dict; with bf16 (DeepSpeed's unfused
    mixed-precision wrapper) also the fp32 master weights, which the bf16 module weights only round."""
    file = tag_dir / (info.get("optim_file") or info["model_file"])  # MoE at EP > 1: its EP rank's file
    sd = load_tensor_file(file, trust=trust)
    opt = sd.get("optimizer") or {}
    masters: list[torch.Tensor] = []
    if (
        "optimizer_state_dict" in opt
    ):  # {"optimizer_state_dict": torch state, "fp32_groups": masters, loss scale}
        masters = [t for group in opt.get("fp32_groups") or [] for t in group]
        opt = opt["optimizer_state_dict"]
    if "state" not in opt:
        raise ReshardError(
            f"'{file}' holds no optimizer state; resume it at its own layout"
        )
    out: dict[str, Tensors] = {}
    flat_names = [n for g in info["groups"] for n in g]
    for idx, name in enumerate(flat_names):
        st = opt["state"].get(idx, {})
        out[name] = {k: st[k].float() for k in STATE_KEYS if k in st}
        if masters:
            out[name]["fp32"] = masters[idx].float()
    step = next((float(st["step"]) for st in opt["state"].values() if "step" in st), 0.0)
    return out, {"step": step}


def _shard_state_zero12(
    tag_dir: Path,
    infos: list[dict[str, Any]],
    groups: list[dict[str, torch.Size]],
    num_layers: int,
    *,
    trust: bool,
) -> tuple[dict[str, Tensors], dict[str, Any]]:
    """ZeRO 1/2: concatenate each parameter's fragments over the DP ranks of one (PP, TP) shard."""
    pieces: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    step = 0.0
    # ZeRO partitions over DP x CP (context-parallel ranks are DeepSpeed's "sequence data parallel"),
    # in the mesh's order: DP rank, then CP rank
    for info in sorted(infos, key=lambda i: (i["dp_rank"], i.get("cp_rank", 0))):
        osd = load_tensor_file(tag_dir / info["optim_file"], trust=trust)["optimizer_state_dict"]
        base = osd["base_optimizer_state"]["state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g], **{k: base[g][k] for k in MOMENTS}}
            step = float(base[g]["step"])
            for raw, frag in mapping.items():
                name = canonical_name(raw, num_layers)
                # MoE: an expert parameter is partitioned over its expert-data-parallel group (the
                # ranks of one EP rank, in DP order); each EP rank holds other experts
                owner = int(info.get("ep_rank", 0)) if is_expert(name) else 0
                for key, t in flat.items():
                    pieces[(name, owner)][key].append(t.narrow(0, frag.start, frag.numel))
    shapes = {n: s for g in groups for n, s in g.items()}
    local = {key: {k: torch.cat(v).float().view(shapes[key[0]]) for k, v in parts.items()}
             for key, parts in pieces.items()}  # fmt: skip
    return _join_experts(local), {"step": step}


def is_expert(name: str) -> bool:
    """A routed expert's parameter (stacked experts, split over expert-parallel ranks along dim 0)."""
    return ".mlp.experts." in name


def _join_experts(local: dict[tuple[str, int], Tensors]) -> dict[str, Tensors]:
    """(name, EP rank) -> state: the experts of every EP rank joined along dim 0 (others: rank 0's)."""
    out: dict[str, Tensors] = {}
    for name, _ in sorted(k for k in local if k[1] == 0):
        ranks = sorted(r for n, r in local if n == name)
        out[name] = {k: torch.cat([local[(name, r)][k] for r in ranks]) for k in local[(name, 0)]}
    return out


def _shard_state_zero3(
    tag_dir: Path,
    infos: list[dict[str, Any]],
    groups: list[dict[str, torch.Size]],
    num_layers: int,
    *,
    trust: bool,
) -> tuple[dict[str, Tensors], dict[str, Any]]:
    """ZeRO 3: each parameter is DP equal pieces (last padded), laid out in parameter order per group."""
    infos = sorted(infos, key=lambda i: i["dp_rank"])
    dp = len(infos)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    step = 0.0
    for info in infos:
        osd = load_tensor_file(tag_dir / info["optim_file"], trust=trust)["optimizer_state_dict"]
        base = osd["optimizer_state_dict"]["state"]
        for g, shapes in enumerate(groups):
            flat = {"fp32": osd["fp32_flat_groups"][g], **{k: base[g][k] for k in MOMENTS}}
            step = float(base[g]["step"])
            offset = 0
            for name, shape in shapes.items():
                part = math.ceil(math.prod(shape) / dp)
                for key, t in flat.items():
                    pieces[name][key].append(t.narrow(0, offset, part))
                offset += part
    shapes = {n: s for g in groups for n, s in g.items()}
    out = {}
    for name, parts in pieces.items():
        numel = math.prod(shapes[name])
        out[name] = {k: torch.cat(v)[:numel].float().view(shapes[name]) for k, v in parts.items()}
    return out, {"step": step}


def _param_shapes(
    tag_dir: Path, info: dict[str, Any], num_layers: int, *, trust: bool
) -> list[dict[str, torch.Size]]:
    """Per optimizer group, plain-model name -> shape, in the group's order (DeepSpeed's `param_shapes`)."""
    sd = load_tensor_file(tag_dir / info["model_file"], trust=trust)
    return [{canonical_name(n, num_layers): s for n, s in g.items()} for g in sd.get("param_shapes") or []]


def _stage_state(
    tag_dir: Path, infos: list[dict[str, Any]], cfg: Config, tp: int, specs: dict[str, Any]
) -> tuple[dict[str, Tensors], float]:
    """Full (TP-merged) moments, and fp32 weights where the optimizer keeps them, of one pipeline stage."""
    L, trust = cfg.model.num_layers, cfg.checkpoint.trust_pickles
    by_tp: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for info in infos:
        by_tp[info["tp_rank"]].append(info)
    shards, step = [], 0.0
    for t in range(tp):
        group = by_tp[t]
        stage = group[0]["zero_stage"]
        if stage == 0:  # dp rank 0's state; with EP, each EP rank's first replica's for its experts
            ep = int(group[0].get("ep", 1))
            states = [_shard_state_zero0(tag_dir, next(i for i in group if i["dp_rank"] == e), trust=trust)
                      for e in range(ep)]  # fmt: skip
            extra = states[0][1]
            state = _join_experts({(n, e): v for e, (st, _) in enumerate(states) for n, v in st.items()
                                   if e == 0 or is_expert(n)})  # fmt: skip
        else:
            reader = _shard_state_zero3 if stage == 3 else _shard_state_zero12
            state, extra = reader(
                tag_dir, group, _param_shapes(tag_dir, group[0], L, trust=trust), L, trust=trust
            )
        shards.append(state)
        step = extra["step"]
    merged: dict[str, Tensors] = {}
    for name, first in shards[0].items():
        spec = specs.get(name) if tp > 1 else None
        merged[name] = {
            k: v if spec is None else merge_by_spec([s[name][k] for s in shards], spec)
            for k, v in first.items()
        }
    return merged, step


def convert(tag_dir: Path, cfg: Config, meta: dict[str, Any]) -> Path:
    """Writes `tag_dir/universal/` (once; reused by later resumes) and returns it."""
    out = tag_dir / UNIVERSAL_DIR
    if (out / STATE_FILE).is_file():
        return out
    layouts = read_shard_maps(tag_dir)
    tp = int(meta.get("tensor_parallel", 1))
    specs = parameter_specs(layouts) if tp > 1 else {}
    trust = cfg.checkpoint.trust_pickles
    _, weights, _ = load_model_state(
        tag_dir, verify=False, trust_pickles=trust
    )  # verified before resuming; full fp32 weights (the master copy in fp32 training)
    by_stage: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for info in layouts:
        by_stage[info["pp_rank"]].append(info)
    model = load_tensor_file(tag_dir / layouts[0]["model_file"], trust=trust)
    counters = {"lr_scheduler": model.get("lr_scheduler"), "global_steps": int(model.get("global_steps") or 0),
                "global_samples": int(model.get("global_samples") or 0)}  # fmt: skip

    def entries() -> Iterable[tuple[str, Tensors]]:
        written: set[str] = set()
        for pp_rank in sorted(by_stage):  # one pipeline stage's optimizer state in memory at a time
            state, counters["step"] = _stage_state(tag_dir, by_stage[pp_rank], cfg, tp, specs)
            for name, entry in state.items():
                if name in written:  # the last stage's copy of the tied embedding module: the first
                    continue  # stage's is the trained one (its position table is unused there)
                written.add(name)
                entry.setdefault("fp32", weights[name])
                yield name, entry

    return write_universal(tag_dir, entries(), counters, total=len(weights))


# ----------------------------------------------------------------------------- load side


def load_universal(engine: Any, universal: Path, cfg: Config, ctx: Any) -> None:
    """Sets this rank's weights, fp32 master copies and AdamW moments (where saved) from `universal/`."""
    stage = int(engine.zero_optimization_stage())
    trust = cfg.checkpoint.trust_pickles
    state = load_tensor_file(universal / STATE_FILE, trust=trust)
    step = float(state["step"])
    opt = torch_optimizer(engine)
    if stage:
        create_flat_optimizer_state(engine, step, MOMENTS)
    masters = fp32_masters(engine)
    rows = cfg.model.padded_vocab_size(ctx.tp)
    for name, p in engine.module.named_parameters():
        cname = canonical_name(name, cfg.model.num_layers)
        entry = fit_vocab_rows_entry(load_tensor_file(universal / f"{cname}.pt", trust=trust), cname, rows)
        spec = partition_info(p)  # the split of the running layout's parameter
        local = {k: full if spec is None else shard_by_spec(full, spec, rank=ctx.tp_rank, size=ctx.tp)
                 for k, full in entry.items()}  # fmt: skip
        if getattr(p, "expert_parallel", False):  # this EP rank's experts of all of them
            local = {k: v.narrow(0, ctx.ep_rank * p.shape[0], p.shape[0]) for k, v in local.items()}
        _set_param(p, local["fp32"], stage)
        moments = [k for k in STATE_KEYS if k in local]  # an import carries weights only: fresh optimizer state
        if stage == 0:
            held = masters.get(id(p), p)  # bf16: the optimizer steps the fp32 master of p
            if held is not p:
                held.data.copy_(local["fp32"].to(held.device, held.dtype))
            if moments:
                opt.state[held] = {
                    "step": torch.tensor(step),
                    **{k: local[k].to(p.device).clone() for k in moments},
                }
            continue
        set_full_fp32_param(p, local["fp32"].to(p.device))
        for key in moments:
            set_full_optimizer_state(p, local[key].to(p.device), key)
    if stage:
        for st in opt.state.values():
            st["step"] = torch.tensor(step) if torch.is_tensor(st.get("step")) else step
    scheduler = engine.lr_scheduler
    if state.get("lr_scheduler") and scheduler is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the next step's rate; loading a state dict alone leaves the old one
    set_step_counters(engine, global_steps=int(state.get("global_steps") or 0),
                      global_samples=int(state.get("global_samples") or 0))  # fmt: skip


def fit_vocab_rows_entry(entry: Tensors, name: str, rows: int) -> Tensors:
    """`fit_vocab_rows` for every tensor (weight, moments) of one universal entry."""
    return {k: fit_vocab_rows({name: v}, rows)[name] for k, v in entry.items()}


def _set_param(p: torch.nn.Parameter, value: torch.Tensor, stage: int) -> None:
    if stage == 3:
        with gathered_for_write(p):
            p.data.copy_(value.to(p.device, p.dtype))
        return
    with torch.no_grad():
        p.data.copy_(value.to(p.device, p.dtype))
