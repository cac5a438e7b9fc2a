"""Check checkpoints offline: every file present, with the size and checksum its MANIFEST records.

  python scripts/verify_checkpoint.py runs/x/checkpoints            (every iter_* in it; `latest` marked)
  python scripts/verify_checkpoint.py runs/x/checkpoints/iter_0000100

Exit status 0 when every checkpoint checked is intact, 1 when any is damaged or incomplete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm.checkpoint.format import META, CheckpointError, latest_tag, verify_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="a checkpoint directory (with iter_* tags) or one iter_* directory")
    args = parser.parse_args()
    path = Path(args.path)
    if (path / META).is_file():
        tags, latest = [path], None
    else:
        tags, latest = sorted(p for p in path.glob("iter_*") if p.is_dir()), latest_tag(path)
    if not tags:
        print(f"error: '{path}' holds no checkpoint (no iter_* directory, no {META})", file=sys.stderr)
        return 1
    damaged = intact = 0
    for tag in tags:
        mark = " (latest)" if tag.name == latest else ""
        try:
            verify_checkpoint(tag)
            intact += 1
            print(f"ok       {tag}{mark}")
        except CheckpointError as e:
            damaged += 1
            print(f"damaged  {tag}{mark}: {e}")
    if latest is not None and not (path / latest).is_dir():
        damaged += 1
        print(f"damaged  {path / 'latest'} names '{latest}', which does not exist")
    print(f"{intact} of {len(tags)} checkpoints intact")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
