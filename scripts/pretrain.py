"""Pretrain a GPT.

deepspeed scripts/pretrain.py --config configs/tiny_cpu.yaml [section.key=value ...]
torchrun --nproc_per_node 2 scripts/pretrain.py --config ... ;  python scripts/pretrain.py --config ...
srun / mpirun ... python scripts/pretrain.py --config ...   (multi-node: scripts/launch/)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from llm.config import load_config
from llm.errors import LLMError, on_every_rank


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes end like config mistakes: one `error:` line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (usage: pretrain.py [--config FILE] [section.key=value ...])")


def _rank() -> int:
    from llm.parallel.launcher import detect_launch

    try:
        return detect_launch().rank
    except LLMError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/*.yaml); defaults apply when omitted")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        try:
            cfg = load_config(args.config, args.overrides)
        except LLMError as e:
            raise on_every_rank(e) from None
        from llm.training.pretrain import run_pretraining
        from llm.training.signals import listen_for_stop

        stop = listen_for_stop()  # SIGTERM/SIGUSR1/SIGINT and a vanished launcher: save, then exit 0
        periodic = None
        if cfg.eval.lm_eval_tasks:  # lm-eval during training; training itself does not import eval
            from llm.eval.harness import training_evaluator

            periodic = training_evaluator(cfg)
        state = run_pretraining(cfg, stop=stop, periodic_eval=periodic)
    except LLMError as e:
        if not (e.rank_zero_only and _rank() != 0):
            print(f"error: {e}", file=sys.stderr)
        if getattr(e, "exit_at_once", False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopped without saving; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    if state.stopped_by:
        print(
            f"stopped at iteration {state.iteration} ({state.stopped_by}); checkpoint saved, rerun to resume"
        )
    else:
        print(
            f"done: iteration {state.iteration}, {state.consumed_samples} samples; run directory {cfg.logging.dir}"
        )
    return 0


if __name__ == "__main__":
    # Everything is written and closed by now (checkpoints, metrics, wandb, TensorBoard) and the
    # process groups are torn down. Leaving without interpreter finalization avoids its rare aborts
    # and hangs in gloo's threads ("terminate called without an active exception", pytorch#179291),
    # which would make a finished run look failed to the launcher.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
