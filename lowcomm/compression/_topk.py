"""Top-k per chunk with bit-packed indices and low-bit values (SparseLoCo-style); use with ErrorFeedback."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch

from lowcomm.compression._bits import pack_bits, packed_nbytes, unpack_bits
from lowcomm.compression._codec import (
    TINY,
    BaseCodec,
    Layout,
    block_views,
    check_finite,
    div,
    num_blocks,
    rdiv,
    register_codec,
)
from lowcomm.compression._errors import CodecError

__all__ = ["TopKCodec"]


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKCodec(BaseCodec):
    """Keeps the ``k`` largest-magnitude values of every ``chunk_size`` consecutive elements.

    Per chunk (the last may be shorter and keeps min(k, its length))::

        idx  = topk(|x|, k)                  # positions inside the chunk, ceil(log2(chunk)) bits each
        m    = |x[idx]|;  lo, hi = min(m), max(m);  L = 2**(value_bits - 1) magnitude levels
        code = sign(x[idx]) << (value_bits-1) | round_half_even((m - lo) * (L - 1) / (hi - lo))
        x'   = 0 everywhere except x'[idx] = sign * (lo + level * (hi - lo) / (L - 1))

    Error bound: dropped elements lose all of their value (|x - x'| = |x|, each no larger than the
    smallest kept magnitude of its chunk); kept ones are off by at most (hi - lo) / (2 (L - 1)),
    plus fp32 rounding. That is a relative L2 error around 0.9 per call on dense random data (k=64
    of 4096), so this codec is only useful inside ``ErrorFeedback``, which re-sends what was
    dropped. Ties at the k-th magnitude are broken by ``torch.topk``. Wire size per chunk:
    k * (index_bits + value_bits) bits plus 8 bytes (lo, hi); the defaults give
    64 * (12 + 2) / 4096 + 64 / 4096 = 0.23 bits per element.

    NaN/inf input raises ValueError.

    Attributes:
        chunk_size: elements per chunk (default 4096 = one 64x64 tile's worth).
        k: values kept per chunk (default 64).
        value_bits: bits per kept value, sign included: 2 (default), 4 or 8.
        fraction: when set, overrides ``k`` with max(1, round(fraction * chunk_size)).
    """

    name: ClassVar[str] = "topk"
    chunk_size: int = 4096
    k: int = 64
    value_bits: int = 2
    fraction: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fraction is not None:
            if (
                not isinstance(self.fraction, int | float)
                or isinstance(self.fraction, bool)
                or not 0 < self.fraction <= 1
            ):
                raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
            if isinstance(self.chunk_size, int):
                # Frozen dataclass: k is derived here, once, before anyone reads it.
                object.__setattr__(self, "k", max(1, round(self.fraction * self.chunk_size)))
        if (
            not isinstance(self.chunk_size, int)
            or isinstance(self.chunk_size, bool)
            or not 2 <= self.chunk_size <= 1 << 16
        ):
            raise ValueError(f"chunk_size must be an int in [2, 65536], got {self.chunk_size!r}")
        if (
            not isinstance(self.k, int)
            or isinstance(self.k, bool)
            or not 1 <= self.k <= self.chunk_size
        ):
            raise ValueError(
                f"k must be an int in [1, chunk_size={self.chunk_size}], got {self.k!r}"
            )
        if self.value_bits not in (2, 4, 8) or isinstance(self.value_bits, bool):
            raise ValueError(f"value_bits must be 2, 4 or 8, got {self.value_bits!r}")

    @property
    def index_bits(self) -> int:
        return max(1, (self.chunk_size - 1).bit_length())

    def _num_kept(self, numel: int) -> int:
        full, tail = divmod(numel, self.chunk_size)
        return full * self.k + min(self.k, tail)

    def _layout(self, shape: tuple[int, ...]) -> Layout:
        numel = math.prod(shape)
        kept = self._num_kept(numel)
        return {
            "ranges": (torch.float32, (num_blocks(numel, self.chunk_size), 2)),
            "indices": (torch.uint8, (packed_nbytes(kept, self.index_bits),)),
            "values": (torch.uint8, (packed_nbytes(kept, self.value_bits),)),
        }

    def _segments(self, x: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(first chunk, first kept slot, 2-D view) for the full chunks, then the tail."""
        for first, v in block_views(x, self.chunk_size):
            yield first, first * self.k, v

    def _encode_flat(self, x: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        numel = x.numel()
        kept = self._num_kept(numel)
        levels = 1 << (self.value_bits - 1)
        ranges = torch.zeros(
            num_blocks(numel, self.chunk_size), 2, dtype=torch.float32, device=x.device
        )
        idx_all = torch.empty(kept, dtype=torch.int64, device=x.device)
        code_all = torch.empty(kept, dtype=torch.int64, device=x.device)
        for first, slot, v in self._segments(x):
            rows, cols = v.shape
            kk = min(self.k, cols)
            mag, idx = v.abs().topk(kk, dim=1, sorted=False)
            lo = mag.amin(dim=1, keepdim=True)
            hi = mag.amax(dim=1, keepdim=True)
            check_finite(hi, self.name)
            span = hi - lo
            ok = span > TINY
            inv = torch.where(ok, rdiv(levels - 1, span), 0.0)
            level = torch.round((mag - lo) * inv).to(torch.int64)
            negative = (v.gather(1, idx) < 0).to(torch.int64)
            ranges[first : first + rows, 0] = lo.view(-1)
            ranges[first : first + rows, 1] = hi.view(-1)
            idx_all[slot : slot + rows * kk] = idx.reshape(-1)
            code_all[slot : slot + rows * kk] = (
                level | (negative << (self.value_bits - 1))
            ).reshape(-1)
        return {
            "ranges": ranges,
            "indices": pack_bits(idx_all, self.index_bits),
            "values": pack_bits(code_all, self.value_bits),
        }

    def _decode_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        numel = out.numel()
        kept = self._num_kept(numel)
        levels = 1 << (self.value_bits - 1)
        idx_all = unpack_bits(parts["indices"], self.index_bits, kept)
        code_all = unpack_bits(parts["values"], self.value_bits, kept)
        ranges = parts["ranges"]
        out.zero_()
        for first, slot, o in self._segments(out):
            rows, cols = o.shape
            kk = min(self.k, cols)
            idx = idx_all[slot : slot + rows * kk].view(rows, kk)
            if bool((idx >= cols).any()):
                raise CodecError(f"topk payload has an index >= its chunk length {cols}")
            code = code_all[slot : slot + rows * kk].view(rows, kk)
            lo = ranges[first : first + rows, 0:1]
            hi = ranges[first : first + rows, 1:2]
            step = torch.where(hi - lo > TINY, div(hi - lo, max(levels - 1, 1)), 0.0)
            mag = (code & (levels - 1)).to(torch.float32) * step + lo
            vals = torch.where((code >> (self.value_bits - 1)) & 1 == 1, -mag, mag)
            o.scatter_(1, idx, vals)
