"""Tokenize a corpus into memory-mapped PREFIX.bin / PREFIX.idx files.

  python scripts/preprocess_data.py --input data/*.jsonl --tokenizer tokenizer/llm_sp8k.model \\
      --output-prefix data/corpus --workers 8
  python scripts/preprocess_data.py --hf-dataset ./my_saved_dataset --split train --tokenizer ... \\
      --output-prefix data/corpus

Every document gets EOS appended. Malformed records are skipped and counted; --strict stops at
the first one. Output appears only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from llm.data.cli import add_input_args, iter_input_records
from llm.data.preprocess import preprocess
from llm.errors import LLMError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_args(parser)
    parser.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model, HF tokenizer dir, or hub name"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed record")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-not-text", type=float, default=0.1, metavar="FRACTION",
                        help="refuse a file more than this fraction of whose records hold NUL bytes or invalid "
                             "UTF-8 (default 0.1)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        records = iter_input_records(args)
        stats = preprocess(
            records,
            tokenizer=args.tokenizer,
            output_prefix=args.output_prefix,
            workers=args.workers,
            json_key=args.json_key,
            strict=args.strict,
            progress=not args.no_progress,
            max_not_text=args.max_not_text,
        )
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"error: {e.strerror or e}: '{e.filename}' (output prefix '{args.output_prefix}')",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(stats.summary())
    print(f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
