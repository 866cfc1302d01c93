"""fp16 and bf16 casting codecs: round-to-nearest-even, 2 bytes per value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch

from lowcomm.compression._codec import BaseCodec, Layout, register_codec

__all__ = ["Bf16Codec", "Fp16Codec"]


class _CastCodec(BaseCodec):
    target: ClassVar[torch.dtype] = torch.float16

    def _layout(self, shape: tuple[int, ...]) -> Layout:
        numel = 1
        for s in shape:
            numel *= s
        return {"values": (self.target, (numel,))}

    def _encode_flat(self, x: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        values = x.to(self.target)
        # One extra pass over the (half-size) output: fp16 turns |x| > 65504 into inf silently.
        if values.numel() and not bool(torch.isfinite(values).all()):
            limit = torch.finfo(self.target).max
            raise ValueError(
                f"{self.name} codec: input contains NaN or inf, or a magnitude above the {self.name} maximum {limit:g}"
            )
        return {"values": values}

    def _decode_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        out.copy_(parts["values"])


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp16Codec(_CastCodec):
    """IEEE half precision, round-to-nearest-even (torch's cast).

    Error bound: |x - x'| <= 2**-11 * |x| for |x| >= 2**-14 (normal range), and <= 2**-25
    otherwise (subnormals). Input with NaN/inf or |x| > 65504 raises ValueError.
    """

    name: ClassVar[str] = "fp16"
    target: ClassVar[torch.dtype] = torch.float16


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class Bf16Codec(_CastCodec):
    """bfloat16, round-to-nearest-even (torch's cast); the fp32 exponent range, 8 significand bits.

    Error bound: |x - x'| <= 2**-8 * |x| for normal values. Input with NaN/inf raises ValueError.
    """

    name: ClassVar[str] = "bf16"
    target: ClassVar[torch.dtype] = torch.bfloat16
