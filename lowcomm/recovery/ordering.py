"""CheckFree+'s out-of-order pipelining: which block stage runs where on each micro-batch.

Stage indices follow the ring layout (docs/algorithms.md section 4): stage 0 holds the
(de)embedding, block stages are 1..N. On odd micro-batches CheckFree+ runs the first two block
stages swapped (2 then 1) and the last two swapped (N then N-1), so each edge stage learns to stand
in for its neighbour and a copy of the neighbour can replace it. The two swapped pairs must be
disjoint, so the swaps need N >= 4 block stages; with 2 or 3 the order is never swapped and the edge
stages have no swap partner (they fall back to the checkpoint).
"""

from __future__ import annotations

__all__ = ["MIN_SWAP_STAGES", "block_order", "swap_partner", "swaps_enabled"]

MIN_SWAP_STAGES = 4


def _check(num_block_stages: int) -> None:
    if num_block_stages < 1:
        raise ValueError(f"num_block_stages must be >= 1, got {num_block_stages}")


def swaps_enabled(num_block_stages: int, *, checkfree_plus: bool) -> bool:
    """Whether CheckFree+ swaps run: it is on and the pipeline has >= 4 block stages."""
    _check(num_block_stages)
    return checkfree_plus and num_block_stages >= MIN_SWAP_STAGES


def swap_partner(stage: int, num_block_stages: int) -> int | None:
    """The block stage that ``stage`` is swapped with under CheckFree+, or None (a middle stage,
    the (de)embedding stage 0, or fewer than 4 block stages)."""
    _check(num_block_stages)
    n = num_block_stages
    if not 1 <= stage <= n:
        if stage == 0:
            return None
        raise ValueError(f"stage must be in 0..{n}, got {stage}")
    if n < MIN_SWAP_STAGES:
        return None
    return {1: 2, 2: 1, n - 1: n, n: n - 1}.get(stage)


def block_order(micro_batch: int, num_block_stages: int, *, swap: bool) -> tuple[int, ...]:
    """The block stages in the order micro-batch ``micro_batch`` runs through them.

    ``swap`` is ``swaps_enabled(...)``: with it, odd micro-batches run (2, 1, 3, ..., N-2, N, N-1);
    otherwise, and on even micro-batches, (1, 2, ..., N).
    """
    _check(num_block_stages)
    if micro_batch < 0:
        raise ValueError(f"micro_batch must be >= 0, got {micro_batch}")
    n = num_block_stages
    order = list(range(1, n + 1))
    if swap and micro_batch % 2 == 1:
        if n < MIN_SWAP_STAGES:
            raise ValueError(f"CheckFree+ swaps need >= {MIN_SWAP_STAGES} block stages, got {n}")
        order[0], order[1] = order[1], order[0]
        order[-1], order[-2] = order[-2], order[-1]
    return tuple(order)
