"""The cross-island exchange of DiLoCo's outer gradients: compression codecs and a collective that
can run in the background while inner steps go on.

What travels, per rank and exchange, for n elements (fp32 is 4n bytes):

- fp32: the tensor itself, summed by an all-reduce (ring: 2 (k - 1) / k x 4n bytes sent per rank
  for k islands).
- bf16 / fp16: the tensor cast (2n bytes).
- int8: blockwise symmetric quantization, one fp32 scale (absmax / 127) per `block` elements
  (n + 4n / block bytes); int4: two values per byte, scale absmax / 7 (n / 2 + 4n / block bytes).

Compressed payloads cannot be summed on the wire (each island has its own scales), so they are
all-gathered (ring: (k - 1) x payload bytes sent per rank) and every island decodes and averages
all k of them in island order: every island computes bitwise the same mean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llm.parallel.process_groups import ParallelContext, _comm_device

_LEVELS = {"int8": 127, "int4": 7}
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(n,) -> (ceil(n / block), block), zero-padded."""
    pad = (-x.numel()) % block
    return torch.nn.functional.pad(x, (0, pad)).view(-1, block)


def encode(x: torch.Tensor, kind: str, *, block: int) -> torch.Tensor:
    """A flat fp32 tensor -> the bytes that travel (uint8), or x itself for fp32."""
    if kind == "fp32":
        return x
    if kind in _CAST:
        return x.to(_CAST[kind]).view(torch.uint8)
    levels = _LEVELS[kind]
    blocks = _blocks(x, block)  # (nb, block)
    scale = blocks.abs().amax(dim=1, keepdim=True) / levels  # (nb, 1)
    q = torch.round(blocks / torch.where(scale > 0, scale, 1.0)).clamp_(-levels, levels).to(torch.int8)
    if kind == "int4":  # two values a byte: (q + 8) in [1, 15], low nibble first
        u = (q + 8).to(torch.uint8).view(-1, block // 2, 2)
        packed = u[..., 0] | (u[..., 1] << 4)  # (nb, block / 2)
    else:
        packed = q.view(torch.uint8)
    return torch.cat([packed.reshape(-1), scale.float().reshape(-1).view(torch.uint8)])


def decode(payload: torch.Tensor, kind: str, *, numel: int, block: int) -> torch.Tensor:
    """The bytes of `encode` -> the flat fp32 tensor they stand for (n elements)."""
    if kind == "fp32":
        return payload
    if kind in _CAST:
        return payload.view(_CAST[kind]).float()
    nb = -(-numel // block)
    values = nb * block if kind == "int8" else nb * block // 2
    body, scale = payload[:values], payload[values:].clone().view(torch.float32).view(nb, 1)  # clone: aligned
    if kind == "int4":
        u = body.view(nb, block // 2)
        q = torch.stack([u & 0xF, u >> 4], dim=-1).view(nb, block).to(torch.int8) - 8
    else:
        q = body.view(torch.int8).view(nb, block)
    return (q.float() * scale).view(-1)[:numel]


def check_block(kind: str, block: int) -> None:
    if kind == "int4" and block % 2:
        raise ValueError(f"int4 packs two values a byte: the block size ({block}) must be even")


@dataclass
class Exchange:
    """One exchange in flight: `wait()` gives the mean over islands of every island's (decoded) tensor."""

    work: Any
    buffers: list[torch.Tensor]
    kind: str
    numel: int
    block: int
    islands: int
    device: torch.device
    wire_bytes: int  # sent by this rank (ring algorithms)
    payload: torch.Tensor  # what this rank sent
    wait_seconds: float = (
        0.0  # training blocked on it: the whole collective, or only `wait()` in the background
    )

    def sent(self) -> torch.Tensor:
        """This rank's tensor as every island reads it (fp32 on the tensor's device)."""
        return decode(self.payload, self.kind, numel=self.numel, block=self.block).to(self.device)

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        if self.work is not None:
            self.work.wait()
        self.wait_seconds += time.perf_counter() - start
        if self.kind == "fp32":
            return (self.buffers[0] / self.islands).to(self.device)
        total = torch.zeros(self.numel, dtype=torch.float32, device=self.buffers[0].device)
        for buf in self.buffers:  # island order: the same sum on every island
            total += decode(buf, self.kind, numel=self.numel, block=self.block)
        return (total / self.islands).to(self.device)


def start_exchange(
    ctx: ParallelContext, values: torch.Tensor, kind: str, *, block: int, background: bool
) -> Exchange:
    """Starts averaging `values` (flat fp32) over the ranks at this rank's place in every island.
    `background`: returns at once, the collective runs while training goes on (gloo and NCCL run
    collectives on their own threads / streams); `wait()` collects it."""
    device, k = values.device, ctx.islands
    payload = encode(values, kind, block=block).to(_comm_device())
    group = ctx.groups["island"]
    if values.numel() == 0:  # this rank holds nothing of the fragment (nor does its peer in any island)
        return Exchange(None, [payload * k], "fp32", 0, block, k, device, 0, payload)
    start = time.perf_counter()
    if kind == "fp32":
        buffers = [payload.clone()]
        work = dist.all_reduce(buffers[0], group=group, async_op=background)
        wire = 2 * (k - 1) * payload.numel() * payload.element_size() // k
    else:
        buffers = [torch.empty_like(payload) for _ in range(k)]
        work = dist.all_gather(buffers, payload, group=group, async_op=background)
        wire = (k - 1) * payload.numel()
    blocked = 0.0 if background else time.perf_counter() - start
    return Exchange(
        work if background else None, buffers, kind, values.numel(), block, k, device, wire, payload, blocked
    )
