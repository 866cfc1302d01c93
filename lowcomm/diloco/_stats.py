"""``OuterStats``: the counters a ``DiLoCo`` trainer keeps for progress lines and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OuterStats"]


@dataclass
class OuterStats:
    """Counters a trainer exposes for progress lines and benchmarks (read from the training thread)."""

    inner_steps: int = 0
    outer_steps: int = 0
    dropped_rounds: int = 0
    retried_rounds: int = 0
    joins: int = 0
    stale_resyncs: int = 0  # all-reduces refused for peers at different outer states, then resynced
    tx_bytes: int = 0
    rx_bytes: int = 0
    comm_wait_s: float = 0.0  # time step() spent blocked on the network
    inner_s: float = 0.0  # time step() spent in the inner optimizer
