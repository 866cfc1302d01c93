"""Plain-torch reference quantizers: one obvious loop-free formula per block, slow is fine.

Written separately from lowcomm.compression (no shared code) so the codecs are checked against an
independent statement of each scheme.
"""

from __future__ import annotations

import torch


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
            q = torch.round((b - lo) * (255.0 / rng))
            assert q.min() >= 0 and q.max() <= 255
            out.append(q * (rng / 255.0) + lo)
        else:
            out.append(torch.full_like(b, lo.item()))
    return torch.cat(out) if out else torch.empty(0)


def int8_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    out = []
    for b in blocks(x, block):
        a = b.abs().max()
        if a > 2.0**-100:
            q = torch.round(b * (127.0 / a))
            assert q.abs().max() <= 127
            out.append(q * (a / 127.0))
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
