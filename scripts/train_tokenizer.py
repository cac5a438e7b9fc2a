"""Train a SentencePiece tokenizer (BPE or unigram, byte fallback) from a corpus.

python scripts/train_tokenizer.py --input corpus/*.jsonl --vocab-size 32000 --output tokenizer/my_sp
python scripts/train_tokenizer.py --builtin-corpus --vocab-size 8192 --output tokenizer/llm_sp8k
"""

from __future__ import annotations

import argparse
import sys

from llm.data.cli import add_input_args, iter_input_records
from llm.data.tokenizer import load_tokenizer
from llm.data.train_tokenizer import DEFAULT_SPECIAL_TOKENS, train_sentencepiece
from llm.errors import LLMError


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_args(parser)
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument(
        "--special-tokens",
        nargs="*",
        default=list(DEFAULT_SPECIAL_TOKENS),
        help="reserved tokens (never split)",
    )
    parser.add_argument(
        "--max-sentences", type=int, default=2_000_000, help="sample at most this many chunks"
    )
    args = parser.parse_args()
    try:
        path = train_sentencepiece(
            iter_input_records(args),
            output=args.output,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            json_key=args.json_key,
            special_tokens=tuple(args.special_tokens),
            max_sentences=args.max_sentences,
        )
    except (LLMError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = load_tokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size}, eos {tok.eos_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
