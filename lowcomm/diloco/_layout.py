"""The flat layout of a replica's parameters: one fp32 vector, fragment by fragment, and the copies
between it and the parameters this process holds (under FSDP2, its local shard of each)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["ParamLayout", "local_shard"]


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds for parameter ``p``: its shard under FSDP2, else its data."""
    to_local = getattr(p, "to_local", None)
    if to_local is not None:
        return to_local()
    return p.data


class ParamLayout:
    """Where each trainable parameter's local shard lives in the flat outer vector.

    The parameters are ordered fragment by fragment, so that each fragment (Streaming DiLoCo's unit
    of sync; the other methods have one) is one contiguous slice ``[lo, hi)``.

    Args:
        params: the model's trainable parameters, in ``model.parameters()`` order.
        fragments: the caller's grouping of ``params`` (each exactly once), or None for the
            default: ``params`` in order, cut into ``num_fragments`` groups of about equal size.
        num_fragments: how many fragments the method syncs separately; a given ``fragments`` must
            have that many. None: one by default, and any given grouping is accepted.

    Raises:
        ValueError: ``fragments`` do not cover ``params`` exactly once, or are not
            ``num_fragments`` many.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        fragments: Sequence[Sequence[nn.Parameter]] | None,
        *,
        num_fragments: int | None,
    ) -> None:
        num = 1 if num_fragments is None else num_fragments
        if fragments is None:
            total = sum(local_shard(p).numel() for p in params)
            groups: list[list[nn.Parameter]] = [[] for _ in range(num)]
            seen = 0
            for p in params:
                groups[min(num - 1, seen * num // total)].append(p)
                seen += local_shard(p).numel()
        else:
            groups = [list(g) for g in fragments]
            if num_fragments is not None and len(groups) != num:
                raise ValueError(f"got {len(groups)} fragments, config.num_fragments is {num}")
            ids = sorted(id(p) for g in groups for p in g)
            if ids != sorted(id(p) for p in params):
                raise ValueError("fragments must hold every trainable parameter exactly once")
        self.params: list[nn.Parameter] = []
        self.fragment_ranges: list[tuple[int, int]] = []
        start = 0
        for g in groups:
            size = sum(local_shard(p).numel() for p in g)
            self.fragment_ranges.append((start, start + size))
            self.params.extend(g)
            start += size
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + local_shard(p).numel())

    @property
    def numel(self) -> int:
        """The length of the flat vector."""
        return self.offsets[-1]

    def slices(self) -> Iterator[tuple[nn.Parameter, int, int]]:
        """Each parameter with its flat range ``[a, b)``, in layout order."""
        return zip(self.params, self.offsets, self.offsets[1:], strict=False)

    @torch.no_grad()
    def gather(self, out: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Copies the local parameters in [lo, hi) of the flat layout into ``out`` (same range)."""
        hi = self.numel if hi is None else hi
        for p, a, b in self.slices():
            if b <= lo or a >= hi:
                continue
            out[a - lo : b - lo].copy_(local_shard(p).reshape(-1))
        return out

    @torch.no_grad()
    def scatter(self, src: torch.Tensor, lo: int = 0, hi: int | None = None) -> None:
        """Copies ``src`` (the flat range [lo, hi)) into the local parameters."""
        hi = self.numel if hi is None else hi
        for p, a, b in self.slices():
            if b <= lo or a >= hi:
                continue
            local = local_shard(p)
            local.copy_(src[a - lo : b - lo].view(local.shape))
