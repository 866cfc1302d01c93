"""``PipelinedLoop``: the one-step-delayed outer loops (async DiLoCo, CO2, delayed Nesterov), where
round k's all-reduce runs during round k+1's inner steps and is applied one round late."""

from __future__ import annotations

import torch

from lowcomm.diloco._collectives import TAG_DELTA, Flight, PseudogradientReducer, SpeedControl
from lowcomm.diloco._outer_state import OuterState

__all__ = ["PipelinedLoop"]


class PipelinedLoop:
    """At the end of round k: apply round k-1's average, start round k's all-reduce.

    The update rule (Nesterov, CO2's, delayed Nesterov's) is ``OuterState``'s; this class owns the
    schedule: the in-flight round, eager updates (``config.eager``), the early apply
    (``config.apply_after_steps``), DyLU (``speed``), and draining the pipeline when peers join,
    since a joiner cannot enter an all-reduce already in flight.
    """

    streams_fragments = False

    def __init__(
        self, state: OuterState, reducer: PseudogradientReducer, speed: SpeedControl
    ) -> None:
        self.state = state
        self.reducer = reducer
        self.speed = speed
        self.config = state.config
        self.in_flight: Flight | None = None

    def after_inner_step(self) -> None:
        state = self.state
        if state.round_steps >= self.speed.local_steps:
            try:
                self._outer_round()
            finally:
                self.speed.restart_round()
        elif state.round_steps == self.config.apply_after_steps and self.in_flight is not None:
            self._apply_early()

    def _outer_round(self) -> None:
        cfg, state, reducer = self.config, self.state, self.reducer
        delta = state.pseudogradient()
        own_speed = self.speed.round_speed(state.round_steps)
        state.round_steps = 0
        # One-step-delayed pipeline: apply round k-1's average, start round k's all-reduce.
        stale: torch.Tensor | None = None
        if self.in_flight is not None:
            flight, self.in_flight = self.in_flight, None
            stale = flight.sent
            avg = reducer.complete(flight, timeout_s=cfg.timeout_s)
            if avg is not None:
                state.apply(avg)
            else:
                delta.add_(flight.sent)  # the dropped round's progress rides with this one
        max_speed = self.speed.wait()
        if reducer.peers_pending():
            # A joiner cannot enter an all-reduce already in flight: drain the pipeline.
            flight = reducer.launch(delta, TAG_DELTA)
            avg = reducer.complete(flight, timeout_s=cfg.timeout_s)
            if avg is not None:
                state.apply(avg)
            else:
                state.carry = flight.sent.clone()  # travels with the next round
            state.admit()
            self.speed.start(own_speed)
            return
        if cfg.eager and state.offset is not None:
            # Eager: this peer's fresh contribution replaces its stale share of the delayed
            # average; tracked as a local offset from the (bit-identical) shared theta.
            world = max(1, int(state.comm.world_size))
            diff = delta - stale if stale is not None else delta.clone()
            state.eager_step(diff.div_(world))
            state.layout.scatter(state.theta + state.offset)
        else:
            state.layout.scatter(state.theta)
        self.speed.update(own_speed, max_speed)
        self.in_flight = reducer.launch(delta, TAG_DELTA)
        self.speed.start(own_speed)

    def _apply_early(self) -> None:
        """Applies last round's average now, tau steps into this round (``apply_after_steps``).

        The local parameters move by exactly as much as the round's starting point does (theta
        plus any eager offset before, the new theta after), so the inner progress made since the
        round began is kept, and the next pseudo-gradient, measured from the new theta, carries it.
        """
        state = self.state
        assert self.in_flight is not None
        flight, self.in_flight = self.in_flight, None
        avg = self.reducer.complete(flight, timeout_s=self.config.timeout_s)
        if avg is None:
            # Dropped: theta and the starting point stay; this peer's share rides with the next.
            state.carry_over(flight.sent)
            return
        local = state.local_params()
        old_start = state.theta.clone()
        if state.offset is not None and state.offset_momentum is not None:
            old_start.add_(state.offset)
            state.offset.zero_()
            state.offset_momentum.zero_()
        state.apply(avg)
        local.add_(state.theta).sub_(old_start)
        state.layout.scatter(local)

    def drain(self, *, timeout_s: float) -> None:
        if self.in_flight is not None:
            avg = self.reducer.complete(self.in_flight, timeout_s=timeout_s)
            self.in_flight = None
            if avg is not None:
                self.state.apply(avg)
        self.speed.wait()

    def settle(self, *, timeout_s: float) -> None:
        flight = self.in_flight
        if flight is None:
            return
        self.in_flight = self.reducer.settle(flight, timeout_s=timeout_s)
        if self.in_flight is None:
            # Dropped, and the local parameters were reset to the round's start when it was
            # launched: this peer's contribution rides with the next round.
            self.state.carry_over(flight.sent)

    def flights(self) -> dict[str, Flight]:
        return {} if self.in_flight is None else {"main": self.in_flight}

    def restore(self, flights: dict[str, Flight]) -> None:
        self.in_flight = flights.get("main")
