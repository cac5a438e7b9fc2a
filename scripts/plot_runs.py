"""Plot the loss curves of one or more runs (their metrics.jsonl) into one image.

  python scripts/plot_runs.py runs/tiny_cpu [runs/other ...] --output curves.png [--log-x] [--size 1600x1000]

Panels against tokens trained: training and validation loss, learning rate, gradient norm,
tokens/s; runs overlaid with their names (--names), resumes and rollbacks marked. The format
follows the extension: .png, .svg, .pdf.
"""

from __future__ import annotations

import argparse
import sys

from llm.errors import LLMError
from llm.eval.plots import PlotError, plot_runs, read_run


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not WIDTHxHEIGHT in pixels, e.g. 1600x1000") from None
    if not (100 <= w <= 20000 and 100 <= h <= 20000):
        raise argparse.ArgumentTypeError(f"'{text}': width and height must lie in [100, 20000] pixels")
    return w, h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run directories (logging.dir)")
    parser.add_argument("--output", "-o", required=True, help="image file: .png, .svg or .pdf")
    parser.add_argument("--names", help="comma-separated names for the runs (default: directory names)")
    parser.add_argument("--log-x", action="store_true", help="logarithmic tokens axis")
    parser.add_argument(
        "--size", type=_size, default=(1600, 1000), help="WIDTHxHEIGHT in pixels (default 1600x1000)"
    )
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else [None] * len(args.runs)
    try:
        if len(names) != len(args.runs):
            raise PlotError(f"--names gives {len(names)} names for {len(args.runs)} runs")
        if not args.output.lower().endswith((".png", ".svg", ".pdf")):
            raise PlotError(f"--output '{args.output}': use a .png, .svg or .pdf file name")
        runs = [read_run(r, n) for r, n in zip(args.runs, names)]
        out = plot_runs(runs, args.output, log_x=args.log_x, size=args.size, title=args.title)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
