"""Parameter names that do not depend on the layout: a pipeline stage's DeepSpeed names mapped to the
plain model's. Checkpoint layouts, resharding and DiLoCo's fragments key every parameter by them."""

from __future__ import annotations


def canonical_prefix(layer_idx: int, num_layers: int) -> str:
    """The plain-model name prefix of the parameters in DeepSpeed pipeline layer `layer_idx`."""
    return f"layers.{layer_idx - 1}." if 1 <= layer_idx <= num_layers else ""


def canonical_name(name: str, num_layers: int) -> str:
    """DeepSpeed pipeline names (`3.mlp.fc.weight`, `tied_modules.embed.embed.weight`) -> plain-model
    names (`layers.2.mlp.fc.weight`, `embed.weight`); plain names are returned unchanged."""
    if name.startswith("tied_modules."):
        return name.split(".", 2)[2]
    head, _, rest = name.partition(".")
    return canonical_prefix(int(head), num_layers) + rest if head.isdigit() else name
