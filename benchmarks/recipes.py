"""Training recipes on the quickstart model, equal tokens: validation loss and step time.

  python benchmarks/recipes.py [--iters 500] [--data PREFIX] [--smoke]

Runs (each scripts/pretrain.py on one process, configs/tiny_cpu.yaml, the built-in corpus):
- adamw_cosine: the quickstart as shipped (AdamW, warmup then cosine decay to min_lr);
- adamw_wsd: WSD the way it is used: a run at the stable rate is stopped at 80% of the iterations
  (its checkpoint), and a cool-down is branched from that checkpoint into its own run directory,
  decaying (1 - sqrt) to min_lr over the last 20% (README, "Training recipes": the branch keeps
  train.train_iters, so it reads the same sample order, and ends its decay with lr_decay_iters);
- muon_wsd: the same with train.optimizer: muon (configs/tiny_cpu_muon_wsd.yaml's settings).
The validation loss is each run's last evaluation (eval.eval_iters = 20 batches of the validation
split); the step time is the mean over the logged steps after the first 20 of the long run (Muon's
Newton-Schulz iterations against AdamW's elementwise update).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, report

PREFIX = REPO / "data" / "builtin" / "builtin_text_document"
COMMON = ["logging.wandb_mode=disabled", "eval.eval_iters=20", "checkpoint.keep_last=2"]
SMOKE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2", "model.seq_length=64",
         "train.micro_batch_size=4", "train.global_batch_size=4", "train.lr_warmup_iters=2", "eval.eval_iters=2",
         "logging.log_interval=1"]  # fmt: skip
WSD = ["train.lr_decay_style=WSD", "train.lr_wsd_decay_style=minus_sqrt"]
RUNS: dict[str, list[str]] = {
    "adamw_cosine": [],
    "adamw_wsd": WSD,
    "muon_wsd": [*WSD, "train.optimizer=muon"],
}


def _pretrain(run_dir: Path, overrides: list[str]) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
           f"logging.dir={run_dir}", *overrides]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _step_time(records: list[dict[str, Any]], after: int) -> float:
    times = [r["step_time"] for r in records if "step_time" in r and r["iteration"] > after]
    return sum(times) / len(times)


def run(name: str, extra: list[str], iters: int, out: Path) -> dict[str, Any]:
    """Every run plans 10 x iters iterations (one sample order for all: the data index follows
    train.train_iters) and ends its schedule and itself at `iters` (lr_decay_iters, exit_interval)."""
    base = [*COMMON, *extra, *RUNS[name], f"train.train_iters={iters * 10}", f"train.lr_decay_iters={iters}",
            f"eval.eval_interval={iters}"]  # fmt: skip
    if name == "adamw_cosine":
        records = long = _pretrain(out / name, [*base, f"train.exit_interval={iters}"])
    else:  # the run at the stable rate stopped at 80%, and the cool-down branched from its checkpoint
        branch_at = iters * 4 // 5
        long = _pretrain(out / f"{name}_long", [*base, f"train.exit_interval={branch_at}"])
        ckpt = out / f"{name}_long" / "checkpoints" / f"iter_{branch_at:07d}"
        records = _pretrain(out / name, [*base, f"train.lr_wsd_decay_iters={iters - branch_at}",
                                         f"train.exit_interval={iters}", f"checkpoint.resume={ckpt}"])  # fmt: skip
    val = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["iteration"] == iters and val[-1]["iteration"] == iters, name
    return {"val_loss": val[-1]["val_loss"], "final_lr": steps[-1]["lr"],
            "step_time_s": _step_time(long, after=min(20, iters // 2))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--data", type=Path, default=PREFIX)
    parser.add_argument("--smoke", action="store_true", help="10 iterations of a smaller model")
    args = parser.parse_args()
    iters = 10 if args.smoke else args.iters
    extra = [f"data.train_data_path={args.data}", *(SMOKE if args.smoke else [])]
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, extra, iters, Path(tmp)) for name in RUNS}
    cosine = results["adamw_cosine"]
    for r in results.values():
        r["val_loss_vs_adamw_cosine"] = r["val_loss"] / cosine["val_loss"] - 1
    results["muon_wsd"]["step_time_vs_adamw"] = results["muon_wsd"]["step_time_s"] / cosine["step_time_s"] - 1
    report("recipes", {"iters": iters, "tokens": iters * (4 * 64 if args.smoke else 16 * 128), "runs": results})


if __name__ == "__main__":
    main()
