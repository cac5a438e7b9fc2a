"""What a run trains on, recorded in every checkpoint and compared on resume.

A resume continues the data order from `consumed_samples`; that order only means something on the
same data. If the files behind a prefix are replaced (same name, another corpus), a dataset is added
to a blend, or a weight, the split or the seed changes, the samples after the resume are not the
ones the run would have seen. `data_identity` describes the data cheaply (no token is read): per
split, each dataset's weight, token and document counts and a fingerprint of its files (their sizes,
and an xxh3-64 of the .idx's first and last 1 MiB: its header and document counts, and the lengths
of the first and last documents). A dataset is matched by its place in the list, not its path, so
moving the files is not a change."""

from __future__ import annotations

from typing import Any

import xxhash

from llm.config import DataConfig
from llm.data.indexed_dataset import IndexedDataset, bin_path, idx_path
from llm.data.loader import parse_data_path

_EDGE = 1 << 20


def file_fingerprint(prefix: str) -> str:
    """xxh3-64 of the .idx's first and last MiB and both files' sizes (hex)."""
    h = xxhash.xxh3_64()
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    size = ipath.stat().st_size
    with ipath.open("rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read())
    h.update(f"{size}:{bpath.stat().st_size}".encode())
    return h.hexdigest()


def _describe(weight: float, prefix: str) -> dict[str, Any]:
    data = IndexedDataset(prefix)
    return {"prefix": prefix, "weight": weight, "tokens": int(data.num_tokens), "documents": len(data),
            "fingerprint": file_fingerprint(prefix)}  # fmt: skip


def data_identity(cfg: DataConfig, *, seed: int) -> dict[str, Any]:
    """{"seed", "split", "train": [dataset, ...], "valid": [...], "test": [...]} (see the module doc);
    `split` is None when valid and test have files of their own."""
    separate = cfg.valid_data_path is not None or cfg.test_data_path is not None
    out: dict[str, Any] = {"seed": seed, "split": None if separate else cfg.split}
    for name in ("train", "valid", "test"):
        pairs = parse_data_path(getattr(cfg, f"{name}_data_path"), f"data.{name}_data_path")
        out[name] = [_describe(w, p) for w, p in pairs]
    return out


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs, one entry each: `train dataset 1 ('/d/web'): tokens 1200 -> 1350`."""
    out = [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in ("seed", "split")
           if saved.get(key) != current.get(key)]  # fmt: skip
    for split in ("train", "valid", "test"):
        before, after = saved.get(split) or [], current.get(split) or []
        for i, (old, new) in enumerate(zip(before, after), 1):
            changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in ("weight", "tokens", "documents", "fingerprint")
                       if old.get(k) != new.get(k)]  # fmt: skip
            if changed:
                out.append(f"{split} dataset {i} ('{new['prefix']}'): {', '.join(changed)}")
        out += [
            f"{split} dataset {i} ('{d['prefix']}') added"
            for i, d in enumerate(after[len(before) :], len(before) + 1)
        ]
        out += [
            f"{split} dataset {i} ('{d['prefix']}') removed"
            for i, d in enumerate(before[len(after) :], len(after) + 1)
        ]
    return out
