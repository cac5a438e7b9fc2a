"""Sample text from a checkpoint (KV cache; temperature, top-k, top-p; seeded).

python scripts/generate.py --checkpoint runs/tiny_cpu/checkpoints --prompt "The list type" --max-new-tokens 80
"""

from __future__ import annotations

import argparse
import sys

from llm.checkpoint.merge import load_trained_model
from llm.data.tokenizer import run_tokenizer
from llm.errors import LLMError
from llm.eval.generate import fit_context, generate
from llm.eval.process import default_device


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the checkpoint's checksum verification"
    )
    parser.add_argument("--trust-pickles", action="store_true",
                        help="unpickle the checkpoint without restriction (it could run code): only one you trust")  # fmt: skip
    parser.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="keep the last context-length tokens of a longer prompt (else: refused)",
    )
    parser.add_argument("--sliding-window", action="store_true",
                        help="generate past the context, each token from the last context-length tokens (else: refused)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cfg, model = load_trained_model(
            args.checkpoint,
            device=default_device(),
            verify=not args.no_verify,
            trust_pickles=args.trust_pickles,
        )
        tok = run_tokenizer(cfg.data.tokenizer, args.tokenizer)
        prompt = tok.encode(args.prompt)
        drop, warnings = fit_context(len(prompt), args.max_new_tokens, model.cfg.max_positions,
                                     truncate_prompt=args.truncate_prompt, sliding_window=args.sliding_window)  # fmt: skip
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    new = generate(
        model,
        prompt[drop:],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=tok.eos_id,
        use_cache=not args.no_cache,
        sliding_window=args.sliding_window,
    )
    shown = args.prompt if not drop else tok.decode(prompt[drop:])
    print(shown + tok.decode([t for t in new if t != tok.eos_id]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
