"""Fault injection for the checkpoint levels: make a named point raise, stall, or count its calls.

lowcomm ships its fault hooks in the library (as torchft ships its erroring process groups) so that
tests inject a fault exactly where the real one would surface and then assert that it fired.

Points (``Checkpointer`` calls ``FaultInjector.hit(point)`` at each):
    ``copy``            before each tensor is copied to the host buffer (background copier thread)
    ``local.write``     before each chunk of a data file is written to local disk
    ``local.open``      before a local data file is created
    ``local.manifest``  before the local manifest is committed
    ``remote.put``      before each object is uploaded to the remote level
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["POINTS", "FaultInjector"]

POINTS = ("copy", "local.write", "local.open", "local.manifest", "remote.put")


@dataclass
class _Rule:
    error: BaseException | None
    delay_s: float
    times: int | None  # None: every hit
    after: int  # let this many hits pass first
    gate: threading.Event | None  # block until it is set (bounded by gate_timeout_s)
    gate_timeout_s: float


class FaultInjector:
    """A thread-safe table of faults keyed by point name; ``fired(point)`` counts injected faults.

    Example::

        faults = FaultInjector()
        faults.inject("local.write", error=OSError(errno.ENOSPC, "No space left on device"))
        ckpt = Checkpointer(config, faults=faults)
        ...
        assert faults.fired("local.write") == 1
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: dict[str, _Rule] = {}
        self._fired: dict[str, int] = {}
        self._hits: dict[str, int] = {}

    def inject(
        self,
        point: str,
        *,
        error: BaseException | None = None,
        delay_s: float = 0.0,
        times: int | None = 1,
        after: int = 0,
        gate: threading.Event | None = None,
        gate_timeout_s: float = 60.0,
    ) -> None:
        """Arm ``point``: its next ``times`` hits (after ``after`` clean ones) wait for ``gate`` to
        be set (at most ``gate_timeout_s``), sleep ``delay_s``, then raise ``error`` if given.
        ``times=None`` arms it for every hit."""
        if point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; known points: {', '.join(POINTS)}")
        if delay_s < 0 or (times is not None and times < 1) or after < 0:
            raise ValueError("delay_s and after must be >= 0 and times >= 1 (or None)")
        with self._lock:
            self._rules[point] = _Rule(
                error=error,
                delay_s=delay_s,
                times=times,
                after=after,
                gate=gate,
                gate_timeout_s=gate_timeout_s,
            )

    def clear(self, point: str | None = None) -> None:
        """Disarm one point, or every point."""
        with self._lock:
            if point is None:
                self._rules.clear()
            else:
                self._rules.pop(point, None)

    def fired(self, point: str) -> int:
        """How many times a fault (delay or error) was injected at ``point``."""
        with self._lock:
            return self._fired.get(point, 0)

    def hits(self, point: str) -> int:
        """How many times ``point`` was reached, faulty or not."""
        with self._lock:
            return self._hits.get(point, 0)

    def hit(self, point: str) -> None:
        """Called by the library at ``point``; sleeps and/or raises when a rule is armed."""
        with self._lock:
            self._hits[point] = self._hits.get(point, 0) + 1
            rule = self._rules.get(point)
            if rule is None:
                return
            if rule.after > 0:
                rule.after -= 1
                return
            if rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    del self._rules[point]
            self._fired[point] = self._fired.get(point, 0) + 1
        if rule.gate is not None:
            rule.gate.wait(rule.gate_timeout_s)
        if rule.delay_s:
            time.sleep(rule.delay_s)
        if rule.error is not None:
            raise rule.error
