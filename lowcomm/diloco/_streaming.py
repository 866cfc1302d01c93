"""``StreamingLoop``: Streaming DiLoCo, one fragment of the parameters synced at a time, each
all-reduce overlapping ``overlap_steps`` inner steps, then merged into the local parameters."""

from __future__ import annotations

from lowcomm.diloco._collectives import (
    TAG_FRAGMENT,
    Flight,
    PseudogradientReducer,
    SpeedControl,
)
from lowcomm.diloco._outer_state import OuterState
from lowcomm.diloco._rules import streaming_merge
from lowcomm.errors import LowcommError

__all__ = ["StreamingLoop"]


class StreamingLoop:
    """Fragment p's pseudo-gradient is sent ``overlap_steps`` inner steps before its turn (one turn
    every ``sync_every / num_fragments`` inner steps) and applied at its turn.

    The schedule is a function of the inner-step counter, so that counter is part of the shared
    state (``streams_fragments``), and the parameters are laid out fragment by fragment.
    """

    streams_fragments = True

    def __init__(
        self, state: OuterState, reducer: PseudogradientReducer, speed: SpeedControl
    ) -> None:
        self.state = state
        self.reducer = reducer
        self.config = state.config
        self.in_flight: dict[int, Flight] = {}  # by fragment index

    def after_inner_step(self) -> None:
        cfg, state = self.config, self.state
        spacing = cfg.sync_every // cfg.num_fragments
        t = state.stats.inner_steps
        ranges = state.layout.fragment_ranges
        if (t + cfg.overlap_steps) % spacing == 0:
            p = ((t + cfg.overlap_steps) // spacing - 1) % cfg.num_fragments
            lo, hi = ranges[p]
            if p in self.in_flight:  # cannot happen with overlap < spacing; be safe
                raise LowcommError(f"fragment {p} is already in flight")
            self.in_flight[p] = self.reducer.launch(state.pseudogradient(lo, hi), TAG_FRAGMENT + p)
        if t % spacing == 0 and self.in_flight:
            p = (t // spacing - 1) % cfg.num_fragments
            flight = self.in_flight.pop(p, None)
            if flight is None:
                return
            lo, hi = ranges[p]
            avg = self.reducer.complete(flight, timeout_s=cfg.timeout_s)
            if avg is not None:
                state.apply(avg, lo, hi)
                local = state.local_params(lo, hi)
                streaming_merge(local, state.theta[lo:hi], alpha=cfg.merge_alpha)
                state.layout.scatter(local, lo, hi)
            # On a drop the fragment keeps its local progress, which its next pseudo-gradient
            # (measured against the unchanged theta) carries.
            if not self.in_flight and self.reducer.peers_pending():
                state.admit()

    def drain(self, *, timeout_s: float) -> None:
        for p in sorted(self.in_flight):
            flight = self.in_flight.pop(p)
            avg = self.reducer.complete(flight, timeout_s=timeout_s)
            lo, hi = self.state.layout.fragment_ranges[p]
            if avg is not None:
                self.state.apply(avg, lo, hi)

    def settle(self, *, timeout_s: float) -> None:
        # A dropped fragment keeps its local progress (its parameters were not reset), which its
        # next pseudo-gradient carries; nothing to keep aside.
        for p in list(self.in_flight):
            settled = self.reducer.settle(self.in_flight.pop(p), timeout_s=timeout_s)
            if settled is not None:
                self.in_flight[p] = settled

    def flights(self) -> dict[str, Flight]:
        return {f"fragment{p}": f for p, f in self.in_flight.items()}

    def restore(self, flights: dict[str, Flight]) -> None:
        self.in_flight = {
            int(name.removeprefix("fragment")): f
            for name, f in flights.items()
            if name.startswith("fragment")
        }
