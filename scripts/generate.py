"""Sample text from a checkpoint (KV cache; temperature, top-k, top-p; seeded).

python scripts/generate.py --checkpoint runs/tiny_cpu/checkpoints --prompt "The list type" --max-new-tokens 80
"""

from __future__ import annotations

import argparse
import sys

from llm.checkpoint.merge import load_trained_model
from llm.data.tokenizer import run_tokenizer
from llm.errors import LLMError
from llm.eval.generate import generate
from llm.eval.loading import default_device


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="override the run's tokenizer")
    parser.add_argument("--no-cache", action="store_true", help="recompute the full context every token")
    parser.add_argument("--no-verify", action="store_true", help="skip the checkpoint's checksum verification")
    args = parser.parse_args()
    try:
        cfg, model = load_trained_model(args.checkpoint, device=default_device(), verify=not args.no_verify)
        tok = run_tokenizer(cfg.data.tokenizer, args.tokenizer)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    new = generate(
        model,
        tok.encode(args.prompt),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=tok.eos_id,
        use_cache=not args.no_cache,
    )
    print(args.prompt + tok.decode([t for t in new if t != tok.eos_id]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
