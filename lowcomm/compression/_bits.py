"""Packing of small unsigned integer codes (1 to 16 bits each) into bytes, vectorised."""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs non-negative integer ``codes`` (each < 2**bits) little-endian into a uint8 tensor.

    Code i occupies bits [i*bits, (i+1)*bits) of the stream, least significant bit first. Costs
    about ``bits`` bytes of temporaries per code: meant for sparse payloads (top-k), not bulk data.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    flat = codes.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = -stream.numel() % 8
    if pad:
        stream = torch.cat((stream, stream.new_zeros(pad)))
    weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverts ``pack_bits``: the first ``count`` codes, as int64."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(
            f"{packed.numel()} packed bytes cannot hold exactly {count} codes of {bits} bits"
        )
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    stream = ((packed.reshape(-1, 1).to(torch.int32) >> shifts) & 1).reshape(-1)[: count * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (stream.view(count, bits).to(torch.int64) * weights).sum(dim=1)
