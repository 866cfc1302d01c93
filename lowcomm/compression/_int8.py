"""int8 absmax quantization, blockwise, round-to-nearest."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar

import torch

from lowcomm.compression._codec import (
    TINY,
    BaseCodec,
    Layout,
    block_views,
    check_block_size,
    check_finite,
    div,
    num_blocks,
    rdiv,
    register_codec,
)

__all__ = ["Int8Codec"]


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Codec(BaseCodec):
    """Symmetric int8 with one fp32 absmax scale per block of ``block_size`` elements::

        a = max(|x|) over the block;  scale = a / 127;  inv = 127 / a
        q  = round_half_even(x * inv)      # in [-127, 127], int8
        x' = q * scale                     # fp32

    Error bound: |x - x'| <= a / 254 per element, plus fp32 rounding (a few ulp of a). Zeros stay exactly
    zero; an all-zero block (or one with a < 2**-100) decodes to zeros. Relative L2 error on a
    2048x2048 tensor with block 64: ~0.0059 Gaussian, ~0.011 Student-t(3).
    Wire size: 1 byte per value plus 4 bytes per block.

    NaN/inf input raises ValueError.

    Attributes:
        block_size: elements sharing one scale (default 64); the last block may be shorter.
    """

    name: ClassVar[str] = "int8"
    block_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_block_size(self.block_size, "block_size")

    def _layout(self, shape: tuple[int, ...]) -> Layout:
        numel = math.prod(shape)
        return {
            "scales": (torch.float32, (num_blocks(numel, self.block_size),)),
            "codes": (torch.int8, (numel,)),
        }

    def _encode_flat(self, x: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        numel = x.numel()
        block = self.block_size
        scales = torch.empty(num_blocks(numel, block), dtype=torch.float32, device=x.device)
        codes = torch.empty(numel, dtype=torch.int8, device=x.device)
        for first, v in block_views(x, block):
            rows = v.shape[0]
            # amin + amax instead of abs().amax(): no full-size temporary (and aminmax along a dim
            # is ~6x slower on CPU, torch 2.13).
            lo = v.amin(dim=1, keepdim=True)
            hi = v.amax(dim=1, keepdim=True)
            a = torch.maximum(hi, lo.neg_())
            check_finite(a, self.name)
            ok = a > TINY
            inv = torch.where(ok, rdiv(127.0, a), 0.0)
            scales[first : first + rows] = torch.where(ok, div(a, 127.0), 0.0).view(-1)
            y = torch.mul(v, inv)
            y.round_()
            codes[first * block : first * block + v.numel()].view(v.shape).copy_(y)
        return {"scales": scales, "codes": codes}

    def _decode_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        block = self.block_size
        codes, scales = parts["codes"], parts["scales"]
        for first, o in block_views(out, block):
            rows = o.shape[0]
            q = codes[first * block : first * block + o.numel()].view(o.shape)
            torch.mul(q, scales[first : first + rows].view(rows, 1), out=o)
