"""Loss curves of one or more runs from their `metrics.jsonl` (matplotlib, no display needed).

Four panels against tokens trained (consumed samples x seq_length, from each run's config.yaml):
training and validation loss, learning rate, gradient norm, tokens/s. Runs are overlaid with their
names; resumes (grey dashed) and loss-spike rollbacks (red dotted) are marked on the loss panel. A
metric a run never logged is left out of its panel; a run with no training record is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llm.errors import LLMError


class PlotError(LLMError, ValueError):
    """A run directory without metrics, or an output that cannot be written."""


@dataclass
class RunCurves:
    name: str
    seq_length: int
    steps: list[dict[str, Any]] = field(default_factory=list)  # records with "loss"
    evals: list[dict[str, Any]] = field(default_factory=list)  # records with "val_loss"
    resumes: list[int] = field(default_factory=list)  # iterations
    rollbacks: list[int] = field(default_factory=list)

    def tokens_at(self, iterations: list[int]) -> np.ndarray:
        """Tokens trained at each iteration: interpolated between logged steps, from iteration 0 (no
        tokens) to the first, and extrapolated at the last steps' rate past the last (an evaluation
        before the first logged step is drawn where it happened, not at that step's tokens)."""
        its = [float(r["iteration"]) for r in self.steps]
        samples = [float(r["consumed_samples"]) for r in self.steps]
        if its[0] > 0:
            its, samples = [0.0, *its], [0.0, *samples]
        at = np.asarray(iterations, dtype=float)
        out = np.interp(at, its, samples)
        if len(its) > 1:
            rate = (samples[-1] - samples[-2]) / (its[-1] - its[-2])
            out = np.where(at > its[-1], samples[-1] + (at - its[-1]) * rate, out)
        return out * self.seq_length


def read_run(run_dir: str | Path, name: str | None = None) -> RunCurves:
    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"'{run}' has no metrics.jsonl; give a run directory (logging.dir of a run)")
    seq_length = 1
    config = run / "config.yaml"
    if config.is_file():
        seq_length = int(((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("seq_length", 1))
    curves = RunCurves(name or run.name, seq_length)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
        if "loss" in record and "consumed_samples" in record:
            curves.steps.append(record)
        elif "val_loss" in record:
            curves.evals.append(record)
        elif "resumed_from" in record:
            curves.resumes.append(int(record["iteration"]))
        elif "rollback" in record:
            curves.rollbacks.append(int(record["iteration"]))
    # A rollback or a resume from an older checkpoint retrains iterations: the later record wins.
    curves.steps = sorted({r["iteration"]: r for r in curves.steps}.values(), key=lambda r: r["iteration"])
    curves.evals = sorted({r["iteration"]: r for r in curves.evals}.values(), key=lambda r: r["iteration"])
    if not curves.steps:
        raise PlotError(f"'{path}' holds no training step record yet (logged every logging.log_interval)")
    return curves


PANELS = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("tokens_per_sec", "tokens/s"),
)


def plot_runs(runs: list[RunCurves], output: str | Path, *, log_x: bool = False, size: tuple[int, int] = (1600, 1000),
              title: str | None = None) -> Path:  # fmt: skip
    """Writes the figure; the format follows the extension (.png, .svg, .pdf)."""
    import matplotlib.pyplot as plt

    fig = build_figure(runs, log_x=log_x, size=size, title=title)
    out = Path(output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=fig.dpi)
    except (OSError, ValueError) as e:
        raise PlotError(f"cannot write '{out}': {e}") from None
    finally:
        plt.close(fig)
    return out


def build_figure(runs: list[RunCurves], *, log_x: bool = False, size: tuple[int, int] = (1600, 1000),
                 title: str | None = None) -> Any:  # fmt: skip
    """The matplotlib Figure: four panels (PANELS) against tokens; per run a training line labelled
    `<name> (train)` (`<name>` on the other panels), validation points `<name> (validation)`, and on
    the loss panel vertical lines `<name> resume` / `<name> rollback`. The caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(2, 2, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        x = run.tokens_at([r["iteration"] for r in run.steps])
        for ax, (key, label) in zip(axes.flat, PANELS):
            pts = [(xi, r[key]) for xi, r in zip(x, run.steps) if r.get(key) is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    color=color,
                    label=f"{run.name} (train)" if key == "loss" else run.name,
                    lw=1.2,
                )
            ax.set_ylabel(label)
        loss_ax = axes.flat[0]
        if run.evals:
            ex = run.tokens_at([r["iteration"] for r in run.evals])
            loss_ax.plot(ex, [r["val_loss"] for r in run.evals], color=color, ls="--", marker="o", ms=3,
                         label=f"{run.name} (validation)")  # fmt: skip
        for its, style, what in ((run.resumes, dict(color="grey", ls="--"), "resume"),
                                 (run.rollbacks, dict(color="red", ls=":"), "rollback")):  # fmt: skip
            for j, xv in enumerate(run.tokens_at(its) if its else []):
                loss_ax.axvline(xv, lw=0.8, label=f"{run.name} {what}" if j == 0 else None, **style)  # type: ignore[arg-type]
    for ax in axes.flat:
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
        if ax.has_data():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
