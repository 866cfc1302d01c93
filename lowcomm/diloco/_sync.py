"""``SyncLoop``: synchronous DiLoCo, the pseudo-gradients averaged and applied at each round's end."""

from __future__ import annotations

from lowcomm.diloco._collectives import TAG_DELTA, Flight, PseudogradientReducer, SpeedControl
from lowcomm.diloco._outer_state import OuterState

__all__ = ["SyncLoop"]


class SyncLoop:
    """Every ``sync_every`` inner steps: all-reduce the pseudo-gradient, wait, apply, admit joiners.

    Nothing is ever in flight between calls, so there is nothing to drain, settle or save.
    """

    streams_fragments = False

    def __init__(
        self, state: OuterState, reducer: PseudogradientReducer, speed: SpeedControl
    ) -> None:
        self.state = state
        self.reducer = reducer
        self.speed = speed

    def after_inner_step(self) -> None:
        state = self.state
        if state.round_steps < self.speed.local_steps:
            return
        try:
            delta = state.pseudogradient()
            state.round_steps = 0
            avg = self.reducer.reduce_now(delta, TAG_DELTA)
            if avg is not None:
                state.apply(avg)
                state.layout.scatter(state.theta)
            # On a drop the local parameters keep their progress and theta is unchanged, so the
            # next pseudo-gradient carries this round's progress by itself.
            if self.reducer.peers_pending():
                state.admit()
        finally:
            self.speed.restart_round()

    def drain(self, *, timeout_s: float) -> None:
        return None

    def settle(self, *, timeout_s: float) -> None:
        return None

    def flights(self) -> dict[str, Flight]:
        return {}

    def restore(self, flights: dict[str, Flight]) -> None:
        return None
