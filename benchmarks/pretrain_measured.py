"""scripts/pretrain.py whose `peak_memory_gb` leaves out what is not a tensor at the start of
training (the interpreter, imported modules, allocator slack), so that it can be compared with the
planner's estimate of model, optimizer and activation memory. Used by benchmarks/plan_memory.py;
takes the same arguments as scripts/pretrain.py.

The CPU accounting walks every Python object once, at the reset (gc.get_objects), so it lives here
and not in llm: training itself never pays for it.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from llm.config import load_config
from llm.errors import LLMError
from llm.training.memory import PeakMemory, status_kb


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of every tensor Python can reach now."""
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            # type() rather than isinstance(): the latter trips deprecation shims of some modules
            if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # sparse, freed weakrefs and such
            continue
    return sum(storages.values())


class TensorPeakMemory(PeakMemory):
    """CPU: the peak of anonymous memory less what was not tensors at the reset."""

    def baseline_bytes(self) -> int:
        anon = ((status_kb("RssAnon") or 0) + (status_kb("RssShmem") or 0)) * 1024
        return anon - live_tensor_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    try:
        from llm.training.pretrain import run_pretraining

        run_pretraining(load_config(args.config, args.overrides), peak_memory=TensorPeakMemory())
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
