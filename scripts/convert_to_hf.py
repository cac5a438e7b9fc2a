"""Hugging Face export and import.

python scripts/convert_to_hf.py --checkpoint runs/x/checkpoints --output hf/x
    -> safetensors + config + tokenizer; AutoModelForCausalLM / AutoTokenizer.from_pretrained("hf/x")
python scripts/convert_to_hf.py --import hf/some_gpt2 --output runs/y/checkpoints [--config C] [--seq-length N]
    -> an llm checkpoint (any layout can resume it) and runs/y/checkpoints/config.yaml; continue with
       deepspeed scripts/pretrain.py --config runs/y/checkpoints/config.yaml checkpoint.resume=runs/y/checkpoints ...
"""

from __future__ import annotations

import argparse
import sys

from llm.config import load_config
from llm.errors import LLMError
from llm.export.from_hf import import_hf
from llm.export.to_hf import export_checkpoint
from llm.progress import show_progress_lines


def main(argv: list[str] | None = None) -> int:
    show_progress_lines()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="export: checkpoint dir (with 'latest') or one iter_* dir")
    src.add_argument("--import", dest="import_dir", help="import: a GPT-2 or Llama transformers directory")
    parser.add_argument("--output", required=True)
    parser.add_argument("--tokenizer", help="export: override the run's tokenizer")
    parser.add_argument(
        "--config", default="configs/tiny_cpu.yaml", help="import: training settings to start from"
    )
    parser.add_argument(
        "--seq-length", type=int, help="import: training sequence length (default: the model's max)"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="export: skip the checkpoint's checksum verification"
    )
    parser.add_argument("--overwrite", action="store_true", help="export: replace what --output holds")
    parser.add_argument("--trust-pickles", action="store_true",
                        help="export: unpickle the checkpoint without restriction (it could run code): only one you trust")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.checkpoint:
            out = export_checkpoint(
                args.checkpoint,
                args.output,
                tokenizer=args.tokenizer,
                verify=not args.no_verify,
                trust_pickles=args.trust_pickles,
                overwrite=args.overwrite,
            )
            print(f"exported {args.checkpoint} -> {out}")
        else:
            tag = import_hf(
                args.import_dir, args.output, base=load_config(args.config), seq_length=args.seq_length
            )
            print(f"imported {args.import_dir} -> {tag}; settings in {tag.parent / 'config.yaml'}")
    except (LLMError, OSError) as e:  # OSError: a transformers directory it cannot read
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
