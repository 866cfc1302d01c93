"""uint8 min-max quantization with a zero point, per chunk, round-to-nearest (unbiased)."""

from __future__ import annotations

import dataclasses
import math
import queue
from collections.abc import Iterator, Mapping
from typing import ClassVar

import numpy as np
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

# 2**23: for 0 <= y < 2**22, the fp32 sum y + 2**23 is the nearest integer to y (ties to even, the
# addition's own rounding) plus 2**23, and its low 8 bits are that integer mod 256. The int32 ->
# uint8 cast keeps those bits, so one add and one cast do what round_() and a float -> uint8 cast
# do in two slower passes (the float -> uint8 cast is the slowest of torch's casts on CPU).
_MAGIC = float(2**23)


def _magic_rounding_works() -> bool:
    """Whether this torch's int32 -> uint8 cast wraps (keeps the low byte) on CPU, vectorised loop
    and tail alike: checked once, since a saturating cast would turn every code into 255."""
    y = torch.arange(4099, dtype=torch.float32).remainder_(256.0).add_(0.5)
    expected = torch.round(y).remainder_(256.0).to(torch.uint8)
    y.add_(_MAGIC)
    got = torch.empty(y.numel(), dtype=torch.uint8)
    got.copy_(y.view(torch.int32))
    return torch.equal(got, expected)


# Checked at the first encode, not at import: torch work at import time in a forkserver or a
# parent that forks would be inherited by its children (torch's thread pool does not survive a
# fork).
_MAGIC_OK: bool | None = None


# The elementwise passes run over pieces of about this many values (1 MiB of fp32): a piece and its
# temporary stay in L2 between the passes, ~20% faster than streaming the whole sub-chunk through
# each pass, and few enough pieces that the per-call overhead stays small.
_PIECE = 1 << 18


def _quantize(v: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, codes: torch.Tensor) -> None:
    """``codes = round((v - lo) * inv)`` for a (rows, block) view ``v`` and per-row ``lo``, ``inv``
    of shape (rows, 1), piece by piece (see ``_PIECE``)."""
    tmp = torch.empty(min(v.numel(), _PIECE), dtype=torch.float32, device=v.device)
    for r, c in _pieces(v):
        piece = v[r, c]
        y = tmp[: piece.numel()].view(piece.shape) if piece.numel() <= tmp.numel() else None
        y = torch.sub(piece, lo[r], out=y) if y is not None else torch.sub(piece, lo[r])
        y.mul_(inv[r])
        _round_into(y, codes[r, c])


def _round_into(y: torch.Tensor, codes: torch.Tensor) -> None:
    """``codes = round_half_even(y)`` for fp32 ``y`` in [0, 255.5) (``y`` is clobbered)."""
    global _MAGIC_OK
    if y.device.type == "cpu" and _MAGIC_OK is None:
        _MAGIC_OK = _magic_rounding_works()
    if y.device.type == "cpu" and _MAGIC_OK:
        y.add_(_MAGIC)
        codes.copy_(y.view(torch.int32))
    else:
        y.round_()
        codes.copy_(y)


# The CPU kernels run in numpy: each ufunc is one single-threaded, vectorised loop that releases the
# GIL (the ring's threads encode and decode side by side) at ~1 us per call (a torch op costs ~5-10
# us and may wake its intra-op pool). Every pass is the same IEEE fp32 operation as the torch one
# (sub, mul, add; min and max; the int32 -> uint8 wrap), so the codes and decoded values are bit for
# bit the same. Blocks of at most _NP_PIECE values have their min and max taken a piece (512 KiB) at a
# time, then are quantized while still in cache: one read of the input from memory instead of three.
_NP_PIECE = 1 << 17
# Quantizing scratch buffers (one piece of fp32 each), reused across encodes and threads (the ring
# starts new threads per operation): a fresh one per encode is an mmap and page faults on every
# first touch. One per concurrent encode at most.
_SCRATCH: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()


def _np_magic_works() -> bool:
    """Whether numpy's int32 -> uint8 cast keeps the low byte (see ``_magic_rounding_works``)."""
    y = np.arange(4099, dtype=np.float32) % np.float32(256) + np.float32(0.5)
    expected = (np.rint(y).astype(np.int64) % 256).astype(np.uint8)
    y += np.float32(_MAGIC)
    got = np.empty(y.size, dtype=np.uint8)
    np.copyto(got, y.view(np.int32), casting="unsafe")
    return bool((got == expected).all())


_NP_MAGIC_OK: bool | None = None
# Off: the CPU runs the torch kernels below too (the tests compare the two).
_NUMPY = True


def _np_stats(
    lo: np.ndarray, hi: np.ndarray, scales: np.ndarray, mins: np.ndarray, name: str
) -> np.ndarray:
    """Writes the rows' scales and mins; returns their ``inv`` (0 where the range is below TINY)."""
    rng = hi - lo
    if not np.isfinite(rng).all():
        check_finite(torch.from_numpy(rng), name)  # raises
    ok = rng > np.float32(TINY)
    inv = np.zeros_like(rng)
    np.divide(np.float32(255.0), rng, out=inv, where=ok)
    scales[:] = 0.0
    np.divide(rng, np.float32(255.0), out=scales, where=ok)
    mins[:] = lo
    return inv


def _np_quantize(
    v: np.ndarray, lo: np.ndarray, inv: np.ndarray, codes: np.ndarray, tmp: np.ndarray
) -> None:
    """``codes = round_half_even((v - lo) * inv)`` for a (rows, cols) piece, ``lo``/``inv`` of
    shape (rows, 1), through ``tmp`` (at least the piece's size)."""
    y = tmp[: v.size].reshape(v.shape)
    np.subtract(v, lo, out=y)
    np.multiply(y, inv, out=y)
    if _NP_MAGIC_OK:
        np.add(y, np.float32(_MAGIC), out=y)
        np.copyto(codes, y.view(np.int32), casting="unsafe")
    else:
        np.rint(y, out=y)
        np.copyto(codes, y, casting="unsafe")


def _np_encode(
    x: np.ndarray, block: int, scales: np.ndarray, mins: np.ndarray, codes: np.ndarray, name: str
) -> None:
    global _NP_MAGIC_OK
    if _NP_MAGIC_OK is None:
        _NP_MAGIC_OK = _np_magic_works()
    try:
        tmp = _SCRATCH.get_nowait()
    except queue.Empty:
        tmp = np.empty(_NP_PIECE, dtype=np.float32)
    try:
        _np_encode_with(x, block, scales, mins, codes, name, tmp)
    finally:
        _SCRATCH.put(tmp)


def _np_encode_with(
    x: np.ndarray,
    block: int,
    scales: np.ndarray,
    mins: np.ndarray,
    codes: np.ndarray,
    name: str,
    tmp: np.ndarray,
) -> None:
    for first, v, q in _np_rows(x, codes, block):
        rows, width = v.shape
        if width <= _NP_PIECE:
            step = max(1, _NP_PIECE // width)
            for r in range(0, rows, step):
                p = v[r : r + step]
                lo = np.minimum.reduce(p, axis=1)
                hi = np.maximum.reduce(p, axis=1)
                b = first + r
                inv = _np_stats(lo, hi, scales[b : b + p.shape[0]], mins[b : b + p.shape[0]], name)
                _np_quantize(p, lo[:, None], inv[:, None], q[r : r + step], tmp)
        else:  # one row longer than a piece: its min and max first, then its pieces
            lo = np.minimum.reduce(v, axis=1)
            hi = np.maximum.reduce(v, axis=1)
            inv = _np_stats(lo, hi, scales[first : first + rows], mins[first : first + rows], name)
            for c in range(0, width, _NP_PIECE):
                _np_quantize(
                    v[:, c : c + _NP_PIECE], lo[:, None], inv[:, None], q[:, c : c + _NP_PIECE], tmp
                )


def _np_decode(
    codes: np.ndarray,
    scales: np.ndarray,
    mins: np.ndarray,
    out: np.ndarray,
    block: int,
    addend: np.ndarray | None,
) -> None:
    """``out = codes * scale + min (+ addend)``, piece by piece: the multiply reads the codes and
    converts them on the fly (the same fp32 products as converting first)."""
    rows_of = _np_rows(out, codes, block)
    adds = _np_rows(addend, codes, block) if addend is not None else None
    for first, o, q in rows_of:
        a = next(adds)[1] if adds is not None else None
        rows, width = o.shape
        sc = scales[first : first + rows, None]
        lo = mins[first : first + rows, None]
        if width <= _NP_PIECE:
            step = max(1, _NP_PIECE // width)
            cuts = [(slice(r, r + step), slice(0, width)) for r in range(0, rows, step)]
        else:
            cuts = [(slice(0, rows), slice(c, c + _NP_PIECE)) for c in range(0, width, _NP_PIECE)]
        for r, c in cuts:
            oo = o[r, c]
            np.multiply(q[r, c], sc[r], out=oo, dtype=np.float32)
            np.add(oo, lo[r], out=oo)
            if a is not None:
                np.add(oo, a[r, c], out=oo)


def _np_rows(
    x: np.ndarray, codes: np.ndarray, block: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first block index, (rows, block) view of ``x``, the same view of ``codes``): the full
    blocks, then the tail (see ``block_views``)."""
    n = x.size
    full = n // block
    if full:
        yield 0, x[: full * block].reshape(full, block), codes[: full * block].reshape(full, block)
    if n % block:
        yield full, x[full * block :].reshape(1, -1), codes[full * block :].reshape(1, -1)


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
        if x.device.type == "cpu" and numel and _NUMPY:
            _np_encode(x.numpy(), block, scales.numpy(), mins.numpy(), codes.numpy(), self.name)
            return {"scales": scales, "mins": mins, "codes": codes}
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
            _quantize(v, lo, inv, codes[first * block : first * block + v.numel()].view(v.shape))
        return {"scales": scales, "mins": mins, "codes": codes}

    def _decode_add_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, addend: torch.Tensor
    ) -> None:
        numel = out.numel()
        block = self._block(numel)
        codes, scales, mins = parts["codes"], parts["scales"], parts["mins"]
        if out.device.type == "cpu" and numel and _NUMPY:
            _np_decode(*_np_parts(codes, scales, mins), out.numpy(), block, addend.numpy())
            return
        _torch_decode(codes, scales, mins, out, block, addend)

    def _decode_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        numel = out.numel()
        block = self._block(numel)
        codes, scales, mins = parts["codes"], parts["scales"], parts["mins"]
        if out.device.type == "cpu" and numel and _NUMPY:
            _np_decode(*_np_parts(codes, scales, mins), out.numpy(), block, None)
            return
        _torch_decode(codes, scales, mins, out, block, None)


def _torch_decode(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    out: torch.Tensor,
    block: int,
    addend: torch.Tensor | None,
) -> None:
    """Decodes into ``out`` (plus ``addend`` where given) with torch kernels, piece by piece.

    copy_ then mul_ computes the same fp32 products as a mixed-dtype mul, 2.4x faster; each piece
    stays in cache between the passes, and the add on the same piece gives the same bits as
    decoding the whole sub-chunk and adding, with one pass over memory fewer."""
    adds = block_views(addend, block) if addend is not None else None
    for first, o in block_views(out, block):
        a = next(adds)[1] if adds is not None else None
        rows = o.shape[0]
        q = codes[first * block : first * block + o.numel()].view(o.shape)
        sc = scales[first : first + rows].view(rows, 1)
        lo = mins[first : first + rows].view(rows, 1)
        for r, c in _pieces(o):
            oo = o[r, c]
            oo.copy_(q[r, c])
            oo.mul_(sc[r])
            oo.add_(lo[r])
            if a is not None:
                oo.add_(a[r, c])


def _pieces(v: torch.Tensor) -> Iterator[tuple[slice, slice]]:
    """(rows, columns) of a (rows, block) view in pieces of about ``_PIECE`` values: whole rows
    while a row is shorter, else slices of one row (see ``_PIECE``). One piece on CUDA."""
    rows, block = v.shape
    if v.device.type != "cpu" or v.numel() <= _PIECE:
        yield slice(0, rows), slice(0, block)
    elif block <= _PIECE:
        step = _PIECE // block
        for r in range(0, rows, step):
            yield slice(r, r + step), slice(0, block)
    else:
        for r in range(rows):
            for c in range(0, block, _PIECE):
                yield slice(r, r + 1), slice(c, c + _PIECE)


def _np_parts(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy views of received parts (read only: a frombuffer view of bytes is not writable)."""
    return codes.detach().numpy(), scales.detach().numpy(), mins.detach().numpy()
