"""The LM head and loss, whole logits against chunks (model.loss_chunk_tokens): peak memory and time.

  python benchmarks/loss_memory.py [--tokens 8192 --hidden 768 --vocab 50304] [--device cpu|cuda] [--smoke]

One forward + backward of hidden states (tokens x hidden) through the output layer (vocab x hidden)
and the token-mean cross-entropy, as GPT.loss computes it: the whole (tokens x vocab) fp32 logits at
once, and `chunked_linear_cross_entropy` with chunks of 1024 and 4096 tokens. Each variant runs in a
fresh process; its peak is the process's peak resident memory over what it held before the first
pass (CPU) or torch.cuda.max_memory_allocated over what was allocated before (GPU). Time: best of 3.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import report

from llm.parallel.cross_entropy import chunked_linear_cross_entropy
from llm.parallel.process_groups import ParallelContext


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def variant(tokens: int, hidden: int, vocab: int, chunk: int, device: str) -> dict[str, float]:
    """One variant in this process (chunk 0: the whole logits)."""
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h = torch.randn(tokens, hidden, device=device, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=gen, dtype=dtype) * 0.02).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=device, generator=gen)

    def step() -> float:
        if chunk:
            loss = chunked_linear_cross_entropy(h, w, target, ParallelContext.single(), vocab_start=0,
                                                vocab_size=vocab, chunk=chunk).mean()  # fmt: skip
        else:
            loss = F.cross_entropy(F.linear(h, w).float(), target)
        loss.backward()
        h.grad = w.grad = None
        return float(loss)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak_bytes(device)  # what the inputs (and the interpreter) hold
    loss = step()
    peak = _peak_bytes(device) - before
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes_over_inputs": peak, "seconds": round(min(times), 4), "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="seconds: 512 tokens, vocab 4096")
    parser.add_argument("--variant", type=int, default=None, help=argparse.SUPPRESS)  # internal: one run
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab = 512, 64, 4096
    if args.variant is not None:
        print(json.dumps(variant(args.tokens, args.hidden, args.vocab, args.variant, args.device)))
        return
    shape = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--device", args.device]
    results: dict[str, dict[str, float]] = {}
    for name, chunk in (("whole_logits", 0), ("chunks_4096", 4096), ("chunks_1024", 1024)):
        out = subprocess.run([sys.executable, __file__, *shape, "--variant", str(chunk)], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        results[name] = json.loads(out.strip().splitlines()[-1])
    whole = results["whole_logits"]
    for r in results.values():
        r["peak_over_whole"] = round(r["peak_bytes_over_inputs"] / max(whole["peak_bytes_over_inputs"], 1), 3)
        r["loss_minus_whole"] = r["loss"] - whole["loss"]
    logits_bytes = args.tokens * args.vocab * 4
    report("loss_memory", {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "device": args.device,
                           "fp32_logits_bytes": logits_bytes, **results})  # fmt: skip


if __name__ == "__main__":
    main()
