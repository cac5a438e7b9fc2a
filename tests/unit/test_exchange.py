"""The codecs of DiLoCo's outer-gradient exchange: what travels and how much of it."""

from __future__ import annotations

import pytest
import torch

from llm.parallel.exchange import decode, encode


@pytest.mark.parametrize("kind, levels, nbytes", [("int8", 127, 1024 + 8 * 4), ("int4", 7, 512 + 8 * 4)])
def test_blockwise_quantization_is_within_half_a_step_of_each_block(
    kind: str, levels: int, nbytes: int
) -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.linspace(1e-4, 10, 1000)
    payload = encode(x, kind, block=128)
    assert (
        payload.dtype == torch.uint8 and payload.numel() == nbytes
    )  # 8 blocks (the last one padded), an fp32 scale each
    y = decode(payload, kind, numel=1000, block=128)
    for start in range(0, 1000, 128):  # each block's error: at most half its step (absmax / levels)
        block = slice(start, start + 128)
        step = x[block].abs().max() / levels
        assert (y[block] - x[block]).abs().max() <= step / 2 + 1e-7
    assert y.abs().max() == pytest.approx(x.abs().max())  # the largest value of each block is exact


def test_zeros_and_casts_round_trip() -> None:
    zeros = torch.zeros(300)
    assert torch.equal(decode(encode(zeros, "int4", block=64), "int4", numel=300, block=64), zeros)
    x = torch.randn(257)
    for kind, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        payload = encode(x, kind, block=128)
        assert payload.numel() == 2 * 257
        assert torch.equal(decode(payload, kind, numel=257, block=128), x.to(dtype).float())
    assert encode(x, "fp32", block=128) is x
