"""``OuterLoop``: the protocol each outer-loop method implements (one class per method family).

``DiLoCo`` picks one implementation from ``config.method`` when it is built and calls it at every
inner step and at ``finish()`` / ``state_dict()`` / ``load_state_dict()``; everything that differs
between the methods (when to reduce, what to apply when, what is in flight) lives behind it:

    ``SyncLoop`` (``diloco``): reduce and apply at the end of each round (docs/algorithms.md
        section 1).
    ``PipelinedLoop`` (``async``, ``co2``, ``delayed_nesterov``): round k's all-reduce overlaps
        round k+1's inner steps and is applied one round late (docs/algorithms.md sections 1-3).
    ``StreamingLoop`` (``streaming``): one fragment at a time, each all-reduce overlapping a few
        inner steps (docs/algorithms.md section 1).
"""

from __future__ import annotations

from typing import Protocol

from lowcomm.diloco._collectives import Flight

__all__ = ["OuterLoop"]


class OuterLoop(Protocol):
    """One outer-loop method over an ``OuterState``. Training thread only; every peer makes the
    same calls in the same order (the collectives inside are matched across peers by order)."""

    def after_inner_step(self) -> None:
        """Runs whatever outer work is due now that one more inner step is done (``stats`` and
        ``round_steps`` already count it): start, complete or apply an all-reduce, admit joiners."""
        ...

    def drain(self, *, timeout_s: float) -> None:
        """Waits for every all-reduce in flight and applies its average (``finish()``)."""
        ...

    def settle(self, *, timeout_s: float) -> None:
        """Completes every all-reduce in flight now, keeping its average to apply on schedule, so
        that ``flights()`` can be saved (``state_dict()``). A round that fails is dropped."""
        ...

    def flights(self) -> dict[str, Flight]:
        """The settled all-reduces to save, by name (``"main"``, ``"fragment<i>"``)."""
        ...

    def restore(self, flights: dict[str, Flight]) -> None:
        """Replaces what is in flight with ``flights`` (from ``flights()``, settled)."""
        ...
