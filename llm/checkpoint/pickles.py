"""Checkpoint files run no code: every `.pt` file is unpickled with torch's `weights_only` unpickler
and an explicit allowlist of the types that we and DeepSpeed write.

A checkpoint may come from someone else, and its MANIFEST can be recomputed to match any payload,
so checksums do not make a file safe: only what the unpickler will build does. torch's weights-only
unpickler builds tensors, containers and primitives; the allowlist adds the few other types our
checkpoints hold (numpy arrays of the RNG states, DeepSpeed's small config and bookkeeping objects).
A file that needs any other global is refused, naming the file and the type, unless the user trusts
the checkpoint (`checkpoint.trust_pickles: true`, `--trust-pickles` on evaluate / generate /
convert_to_hf), which loads it with full unpickling.

DeepSpeed's own loader unpickles without restriction, so every file of a checkpoint is checked here
before DeepSpeed sees it (`check_files`: memory-mapped, so the tensor bytes are not read, only the
pickled structure is built). The globals a file references are listed from its pickle opcodes first,
so DeepSpeed's types are imported only when a file needs them (evaluation need not import DeepSpeed).
"""

from __future__ import annotations

import importlib
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from llm.errors import LLMError

# Types (beyond torch's own weights-only set) that checkpoints written by llm and DeepSpeed 0.19 hold.
ALLOWED_GLOBALS = (
    # numpy arrays: the numpy RNG state (rng/rank_*.pt); numpy 1 and 2 spell the module differently
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    # DeepSpeed's model and optimizer states
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.checkpoint.constants.PARAM_SLICE_MAPPINGS",
)


# Built by an allowed global without being named in the pickle: numpy.dtype("uint32") returns a
# numpy.dtypes.UInt32DType, whose state the unpickler then sets.
_BUILT_BY = {
    "numpy.dtype": ("numpy.dtypes.UInt32DType", "numpy.dtypes.Int64DType", "numpy.dtypes.Float64DType")
}


class UnsafeCheckpointError(LLMError, ValueError):
    """A checkpoint file that would run code (or build a type we do not allow) when loaded."""


def _refusal(file: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"checkpoint file '{file}' needs {what} to load, which llm does not build from a file (unpickling it "
        "could run code): if you trust where this checkpoint comes from, load it with checkpoint.trust_pickles=true "
        "(--trust-pickles for evaluate.py, generate.py and convert_to_hf.py)"
    )


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _globals_needed(file: Path) -> list[str]:
    """The globals the file's pickle references beyond torch's weights-only set (read from its
    opcodes, without unpickling); raises UnsafeCheckpointError for one we do not allow."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except (pickle.UnpicklingError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile):
        return []  # not a plain torch zip file, or opcodes the scan does not know: the unpickler decides
    refused = sorted(n for n in needed if n not in ALLOWED_GLOBALS)
    if refused:
        raise _refusal(file, f"the type '{refused[0]}'")
    return sorted(needed)


def load_file(file: Path, *, trust: bool = False, mmap: bool = False) -> Any:
    """torch.load of one checkpoint file onto the CPU, restricted as above (`trust`: unrestricted)."""
    if trust:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    allowed = []
    for name in _globals_needed(file):
        for dotted in (name, *_BUILT_BY.get(name, ())):
            try:
                allowed.append(_resolve(dotted))
            except (ImportError, AttributeError):
                if dotted == name:
                    raise _refusal(file, f"the type '{name}' (not importable here)") from None
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(file, _what_was_refused(str(e))) from None


def _what_was_refused(text: str) -> str:
    """The type (or pickle operation) in torch's weights-only error message."""
    match = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>|Unsupported operand (\S+)", text)
    if match is None:
        return "more than tensors and plain values"
    name, built, operand = match.groups()
    return f"the pickle operation {operand}" if operand else f"the type '{name or built}'"


def pickled_files(tag_dir: Path) -> list[Path]:
    """Every torch file of a checkpoint, sorted (DeepSpeed's, ours, islands', the universal form)."""
    return sorted(f for f in tag_dir.rglob("*.pt") if f.is_file())


def check_files(files: Iterable[Path]) -> None:
    """Unpickles each file the restricted way (memory-mapped: the tensor data is not read) and
    discards it; raises UnsafeCheckpointError for the first that needs a type we do not allow."""
    for file in files:
        try:
            load_file(file, mmap=True)
        except RuntimeError as e:  # mmap needs torch's zip format: an older file is read whole
            if "mmap" not in str(e):
                raise
            load_file(file)
