"""uint8 min-max quantization with a zero point, per chunk, round-to-nearest (unbiased)."""

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

__all__ = ["Uint8Codec"]


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class Uint8Codec(BaseCodec):
    """Min-max uint8 with a zero point, like PCCL's MIN_MAX but rounding instead of truncating.

    For each chunk of ``block_size`` consecutive elements (the whole tensor when None)::

        lo, hi = min(x), max(x);  scale = (hi - lo) / 255;  inv = 255 / (hi - lo)
        q  = round_half_even((x - lo) * inv)        # in [0, 255], uint8
        x' = q * scale + lo                          # fp32

    Error bound: |x - x'| <= (hi - lo) / 510 per element, plus fp32 rounding (a few ulp of
    max(|lo|, |hi|)); the error has mean ~0 (no truncation bias). A constant chunk decodes
    exactly; a chunk whose range is below 2**-100 decodes to its minimum. Relative L2 error on a
    2048x2048 Gaussian: ~0.0097 with the default 65536-element chunks (~0.0112 with one chunk);
    heavy tails stretch the range: ~0.078 on Student-t(3) (~0.23 with one chunk), where int8
    with small blocks does far better. Wire size: 1 byte per value plus 8 bytes per chunk.

    NaN/inf input, or a range that overflows fp32, raises ValueError.

    Attributes:
        block_size: elements per chunk, each with its own min and scale; None: one per tensor.
    """

    name: ClassVar[str] = "uint8"
    block_size: int | None = 65536

    def __post_init__(self) -> None:
        super().__post_init__()
        check_block_size(self.block_size, "block_size", allow_none=True)

    def _block(self, numel: int) -> int:
        return max(numel, 1) if self.block_size is None else self.block_size

    def _layout(self, shape: tuple[int, ...]) -> Layout:
        numel = math.prod(shape)
        nb = num_blocks(numel, self._block(numel))
        return {
            "scales": (torch.float32, (nb,)),
            "mins": (torch.float32, (nb,)),
            "codes": (torch.uint8, (numel,)),
        }

    def _encode_flat(self, x: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        numel = x.numel()
        block = self._block(numel)
        nb = num_blocks(numel, block)
        scales = torch.empty(nb, dtype=torch.float32, device=x.device)
        mins = torch.empty(nb, dtype=torch.float32, device=x.device)
        codes = torch.empty(numel, dtype=torch.uint8, device=x.device)
        for first, v in block_views(x, block):
            rows = v.shape[0]
            # amin + amax, not aminmax: aminmax along a dim is ~6x slower on CPU (torch 2.13).
            lo = v.amin(dim=1, keepdim=True)
            hi = v.amax(dim=1, keepdim=True)
            rng = hi - lo
            check_finite(rng, self.name)
            ok = rng > TINY
            inv = torch.where(ok, rdiv(255.0, rng), 0.0)
            scales[first : first + rows] = torch.where(ok, div(rng, 255.0), 0.0).view(-1)
            mins[first : first + rows] = lo.view(-1)
            y = torch.sub(v, lo)
            y.mul_(inv)
            y.round_()
            codes[first * block : first * block + v.numel()].view(v.shape).copy_(y)
        return {"scales": scales, "mins": mins, "codes": codes}

    def _decode_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        numel = out.numel()
        block = self._block(numel)
        codes, scales, mins = parts["codes"], parts["scales"], parts["mins"]
        for first, o in block_views(out, block):
            rows = o.shape[0]
            q = codes[first * block : first * block + o.numel()].view(o.shape)
            # copy_ then mul_ computes the same fp32 products as a mixed-dtype mul, 2.4x faster.
            o.copy_(q)
            o.mul_(scales[first : first + rows].view(rows, 1))
            o.add_(mins[first : first + rows].view(rows, 1))
