"""Perplexity of a checkpoint on a token file or on text documents, or lm-evaluation-harness tasks.

  python scripts/evaluate.py --checkpoint runs/x/checkpoints --data data/corpus [--split valid] [--json]
  python scripts/evaluate.py --checkpoint runs/x/checkpoints --input held_out.jsonl [--json]
  torchrun --nproc_per_node 8 scripts/evaluate.py ...   (each process takes every 8th window)
  python scripts/evaluate.py --checkpoint runs/x/checkpoints --tasks hellaswag,lambada_openai \
      [--num-fewshot N] [--limit N] [--include-path my_tasks/] [--output results.json]

Scheme (see llm/eval/perplexity.py): documents + EOS concatenated; windows of seq_length + 1
tokens overlapping by one, so every token but the first is predicted exactly once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llm.checkpoint.merge import load_trained_model
from llm.data.gpt_dataset import split_ranges
from llm.data.indexed_dataset import IndexedDataset
from llm.data.sources import expand_inputs, iter_file_records
from llm.data.tokenizer import run_tokenizer
from llm.errors import LLMError
from llm.eval.perplexity import evaluate_stream, token_stream
from llm.eval.process import default_device, eval_context
from llm.progress import show_progress_lines


def _stream(args: argparse.Namespace, cfg) -> np.ndarray:  # type: ignore[no-untyped-def]
    if args.data:
        data = IndexedDataset(args.data)
        lo, hi = (
            (0, len(data))
            if args.split == "all"
            else split_ranges(len(data), cfg.data.split)[("train", "valid", "test").index(args.split)]
        )
        return np.asarray(data.tokens[data.offsets[lo] : data.offsets[hi]], dtype=np.int64)
    tok = run_tokenizer(cfg.data.tokenizer, args.tokenizer)
    records = (r for p in expand_inputs(args.input) for r in iter_file_records(p, json_key=args.json_key))
    return token_stream(records, tok, json_key=args.json_key)


def _run_lm_eval(args: argparse.Namespace, cfg, model) -> int:  # type: ignore[no-untyped-def]
    from llm.eval.harness import run_tasks, write_results

    tok = run_tokenizer(cfg.data.tokenizer, args.tokenizer)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_tasks(model, tok, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                        include_path=args.include_path, batch_size=args.batch_size,
                        log_samples=args.log_samples)  # fmt: skip
    from lm_eval.utils import make_table

    print(make_table(results))
    out = write_results(results, args.output or Path(args.checkpoint).resolve().parent / "lm_eval.json")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    show_progress_lines()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint dir (with 'latest') or one iter_* dir"
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a PREFIX of .bin/.idx token files")
    src.add_argument("--input", nargs="+", help=".jsonl / .txt / .parquet files")
    src.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (needs the eval extra)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="with --tasks")
    parser.add_argument(
        "--limit", type=float, default=None, help="with --tasks: examples per task (or a fraction)"
    )
    parser.add_argument("--include-path", default=None, help="with --tasks: a directory of task YAMLs")
    parser.add_argument(
        "--log-samples", action="store_true", help="with --tasks: every document's scores in the JSON"
    )
    parser.add_argument("--output", default=None,
                        help="with --tasks: the results JSON (default: lm_eval.json beside the checkpoint directory)")  # fmt: skip
    parser.add_argument("--split", choices=["all", "train", "valid", "test"], default="all",
                        help="with --data: the part of the file under the run's data.split")  # fmt: skip
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizer", help="override the run's tokenizer (for --input)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print a JSON line last")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the checkpoint's checksum verification"
    )
    parser.add_argument("--trust-pickles", action="store_true",
                        help="unpickle the checkpoint without restriction (it could run code): only one you trust")  # fmt: skip
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by `deepspeed`
    args = parser.parse_args(argv)

    def load() -> tuple:  # after eval_context() where there is one: it sets the device a process uses
        return load_trained_model(args.checkpoint, device=default_device(), verify=not args.no_verify,
                                  trust_pickles=args.trust_pickles)  # fmt: skip

    if args.tasks:
        try:
            cfg, model = load()
            return _run_lm_eval(args, cfg, model)
        except LLMError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    ctx = eval_context()  # several processes (torchrun / deepspeed / srun) split the windows
    try:
        cfg, model = load()
        stream = _stream(args, cfg)
        result = evaluate_stream(
            model, stream, seq_length=cfg.model.seq_length, batch_size=args.batch_size, ctx=ctx, data=cfg.data
        )
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ctx.shutdown()
    if ctx.rank != 0:
        return 0
    print(f"perplexity: {result.perplexity:.4f} (loss {result.loss:.4f} over {result.tokens} tokens)")
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
