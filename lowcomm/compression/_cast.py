"""fp16 and bf16 casting codecs: round-to-nearest-even, 2 bytes per value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch

from lowcomm.compression._codec import BaseCodec, Layout, check_finite, register_codec

__all__ = ["Bf16Codec", "Fp16Codec"]


class _CastCodec(BaseCodec):
    target: ClassVar[torch.dtype] = torch.float16

    def _layout(self, shape: tuple[int, ...]) -> Layout:
        numel = 1
        for s in shape:
            numel *= s
        return {"values": (self.target, (numel,))}

    def _encode_flat(self, x: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        if x.numel():
            # Two fast reductions over the input (they propagate NaN) instead of an isfinite pass
            # over the output: NaN/inf, and values that round to inf, raise instead of travelling.
            peak = torch.maximum(x.amax(), x.amin().neg())
            check_finite(peak, self.name)
            info = torch.finfo(self.target)
            overflow = info.max + info.eps * (info.max / (2 - info.eps)) / 2  # max + half an ulp
            if float(peak) >= overflow:
                raise ValueError(
                    f"{self.name} codec: a magnitude of {float(peak):g} overflows {self.name} (max {info.max:g})"
                )
        return {"values": x.to(self.target)}

    def _decode_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        out.copy_(parts["values"])


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp16Codec(_CastCodec):
    """IEEE half precision, round-to-nearest-even (torch's cast).

    Error bound: |x - x'| <= 2**-11 * |x| for |x| >= 2**-14 (normal range), and <= 2**-25
    otherwise (subnormals). Input with NaN/inf, or |x| >= 65520 (which would round to inf),
    raises ValueError.
    """

    name: ClassVar[str] = "fp16"
    target: ClassVar[torch.dtype] = torch.float16


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class Bf16Codec(_CastCodec):
    """bfloat16, round-to-nearest-even (torch's cast); the fp32 exponent range, 8 significand bits.

    Error bound: |x - x'| <= 2**-8 * |x| for normal values. Input with NaN/inf, or a magnitude
    that would round to inf (>= 3.3962e38), raises ValueError.
    """

    name: ClassVar[str] = "bf16"
    target: ClassVar[torch.dtype] = torch.bfloat16
