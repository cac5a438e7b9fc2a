"""Argument helpers shared by the data entry scripts (preprocess_data, train_tokenizer)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from llm.data.sources import InputError, Record, expand_inputs, iter_file_records, iter_hf_records


def add_input_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (one of --input, --hf-dataset, --builtin-corpus)")
    src.add_argument(
        "--input", nargs="+", metavar="PATH", help=".txt/.jsonl/.jsonl.gz/.parquet files, dirs or globs"
    )
    src.add_argument(
        "--hf-dataset", metavar="NAME", help="a Hugging Face dataset: save_to_disk dir, or hub name"
    )
    src.add_argument("--hf-config", default=None, help="dataset configuration name (hub datasets)")
    src.add_argument("--split", default="train", help="dataset split (default: train)")
    src.add_argument("--builtin-corpus", action="store_true", help="the built-in corpus (Python's own docs)")
    parser.add_argument("--json-key", default="text", help="field holding the text (jsonl, parquet, HF)")


def iter_input_records(args: argparse.Namespace) -> Iterator[Record]:
    """Records from whichever input the user chose; raises InputError for missing inputs."""
    chosen = sum(bool(x) for x in (args.input, args.hf_dataset, args.builtin_corpus))
    if chosen != 1:
        raise InputError("give exactly one of --input, --hf-dataset, --builtin-corpus")
    if args.builtin_corpus:
        from llm.data.builtin_corpus import iter_documents

        return (Record("str", t, "builtin-corpus", i) for i, t in enumerate(iter_documents(), start=1))
    if args.hf_dataset:
        return iter_hf_records(args.hf_dataset, config=args.hf_config, split=args.split, key=args.json_key)
    files = expand_inputs(args.input)  # raises early, before any output is created

    def gen() -> Iterator[Record]:
        for path in files:
            yield from iter_file_records(path, json_key=args.json_key)

    return gen()
