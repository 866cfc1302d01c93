"""Plain-torch reference quantizers: one obvious loop-free formula per block, slow is fine.

Written separately from lowcomm.compression (no shared code) so the codecs are checked against an
independent statement of each scheme.
"""

from __future__ import annotations

import torch


def exact_div(a: float | torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    """a / b correctly rounded to fp32: a double division of fp32 operands, then one rounding to
    fp32, is the IEEE fp32 quotient (53 >= 2 * 24 + 2 bits, so the double rounding is harmless)."""
    return torch.tensor(float(a) / float(b), dtype=torch.float32)


def blocks(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    """The flattened tensor cut into consecutive blocks (the last one may be shorter)."""
    flat = x.reshape(-1).float()
    return [flat[i : i + block] for i in range(0, flat.numel(), block)]


def uint8_minmax(x: torch.Tensor, block: int) -> torch.Tensor:
    out = []
    for b in blocks(x, block):
        lo, hi = b.min(), b.max()
        rng = hi - lo
        if rng > 2.0**-100:
            q = torch.round((b - lo) * exact_div(255.0, rng))
            assert q.min() >= 0 and q.max() <= 255
            out.append(q * exact_div(rng, 255.0) + lo)
        else:
            out.append(torch.full_like(b, lo.item()))
    return torch.cat(out) if out else torch.empty(0)


def int8_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    out = []
    for b in blocks(x, block):
        a = b.abs().max()
        if a > 2.0**-100:
            q = torch.round(b * exact_div(127.0, a))
            assert q.abs().max() <= 127
            out.append(q * exact_div(a, 127.0))
        else:
            out.append(torch.zeros_like(b))
    return torch.cat(out) if out else torch.empty(0)


def bf16_rne(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 -> fp32 by integer bit arithmetic: round to nearest, ties to even."""
    bits = x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded)
    return rounded.to(torch.int32).view(torch.float32)


def _nearest_even(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid point to each y (float64 distances are exact here); ties -> even."""
    d = (y.double().reshape(-1, 1) - grid.double().reshape(1, -1)).abs()
    best = d.min(dim=1, keepdim=True).values
    candidates = d == best
    even_bonus = (torch.arange(grid.numel()) % 2 == 0).double() * 0.5
    return (candidates.double() * (1 + even_bonus)).argmax(dim=1)


def e4m3_values() -> torch.Tensor:
    """Every non-negative finite float8_e4m3fn value, in code order (code 0x00 .. 0x7E)."""
    vals = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def fp8_e4m3(x: torch.Tensor, rows: int | None, block: int | None) -> torch.Tensor:
    """Row-wise (rows given) or blockwise absmax scaling to 448, nearest e4m3 value by brute force."""
    grid = e4m3_values()
    flat = x.reshape(-1).float()
    pieces = list(flat.view(rows, -1)) if rows is not None else blocks(flat, block or 1)
    out = []
    for b in pieces:
        a = b.abs().max()
        if a <= 2.0**-100:
            out.append(torch.zeros_like(b))
            continue
        y = b * exact_div(448.0, a)
        mag = grid[_nearest_even(y.abs(), grid)].float()
        out.append(torch.where(y < 0, -mag, mag) * exact_div(a, 448.0))
    return torch.cat(out) if out else torch.empty(0)


FP4 = {
    "e2m1": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    "e3m0": [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
}


def fp4(x: torch.Tensor, variant: str, block: int) -> torch.Tensor:
    grid = torch.tensor(FP4[variant], dtype=torch.float64)
    top = FP4[variant][-1]
    out = []
    for b in blocks(x, block):
        a = b.abs().max()
        if a <= 2.0**-100:
            out.append(torch.zeros_like(b))
            continue
        y = b * exact_div(top, a)
        mag = grid[_nearest_even(y.abs(), grid)].float()
        out.append(torch.where(y < 0, -mag, mag) * exact_div(a, top))
    return torch.cat(out) if out else torch.empty(0)
