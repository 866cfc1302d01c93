"""Fault injection: make a named point of the library raise, stall, die, stop or corrupt, and count it.

lowcomm ships its fault hooks in the library (as torchft ships its erroring process groups) so that
a test, ours or a user's, injects a fault exactly where the real one would surface and then asserts
that it fired. Every component that has fault points takes a ``faults=`` injector (``CommConfig``,
``Master``, ``Checkpointer``, ``DiLoCo``); with none given, a hit costs one attribute check.

Usage::

    faults = FaultInjector()
    faults.inject("ring.send", kill=True, where={"step": 1, "sub": 1})  # die mid all-reduce
    faults.inject("local.write", error=OSError(errno.ENOSPC, "No space left on device"))
    ...
    assert faults.fired("local.write") == 1

Actions, applied in this order when an armed rule matches a hit: wait for ``gate`` (bounded), sleep
``delay_s``, call ``call(context)``, ``stop`` (SIGSTOP this process, then block the calling thread
for good so nothing it guards leaves even if the signal lands late), ``kill`` (``os._exit``: no
clean-up, sockets torn down by the kernel, as SIGKILL does), raise ``error``. ``corrupt=True`` does
none of these: ``hit()`` returns True and the caller damages what it is about to send or write.

The points, by component (``POINTS`` maps each to where it fires and the context it passes):
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CORRUPTIBLE", "KILLED_EXIT_CODE", "POINTS", "FaultInjector", "damaged"]

# The exit status of a process killed by a ``kill=True`` rule: tests tell it from a crash.
KILLED_EXIT_CODE = 17

POINTS: dict[str, str] = {
    # transport (lowcomm.comm)
    "ring.send": "a ring thread is about to send sub-chunk `sub` of step `step` (context: step, "
    "sub; corrupt: the sub-chunk is sent damaged)",
    "state.serve": "a peer serving shared state is about to send chunk number `chunk` (context: "
    "chunk, name)",
    "comm.gate": "an all_reduce's gate just opened on this peer, before its ring is built "
    "(context: tag, op)",
    "p2p.send": "send() is about to send a tensor's data to `peer` (context: peer, tag)",
    # master (lowcomm.comm.master)
    "master.request": "the master is about to answer request `op` from `peer` (context: op, peer)",
    "master.commit": "a commit-protocol message at the master: `message` 'vote' (a peer's first "
    "vote on operation `op` was received, not yet recorded) or 'verdict' (a peer's verdict is "
    "about to be sent; while faults are armed verdicts leave one at a time); `index`: how many of "
    "that message the operation had before, so a kill at verdict 1 dies with exactly one sent "
    "(context: message, index, op, peer)",
    # checkpoint levels (lowcomm.checkpoint)
    "copy": "the background copier is about to copy one tensor to the host buffer",
    "local.write": "a chunk of a data file is about to be written to local disk (corrupt: the "
    "chunk is written damaged, after its checksum)",
    "local.open": "a local data file is about to be created",
    "local.manifest": "the local manifest is about to be committed",
    "remote.put": "an object is about to be uploaded to the remote level",
    # pipeline (lowcomm.recovery)
    "pipeline.micro_batch": "a pipeline stage is about to run micro-batch `mb` of step `step` "
    "(`phase` 'forward' or 'backward'; context: stage, step, mb, phase)",
    "pipeline.serve": "a pipeline stage is about to send its state to the replacement of lost "
    "stage `to_stage` during the recovery at step `step` (context: stage, to_stage, step)",
    # outer loop (lowcomm.diloco)
    "trainer.inner_step": "DiLoCo.step() starts inner step `step` (context: step)",
}
# The points whose callers honour ``corrupt=True`` (damage what they send or write).
CORRUPTIBLE = frozenset({"ring.send", "p2p.send", "local.write"})

__doc__ = (__doc__ or "") + "".join(f"\n    ``{k}``: {v}" for k, v in POINTS.items()) + "\n"


@dataclass
class _Rule:
    error: BaseException | None
    delay_s: float
    kill: bool
    stop: bool
    corrupt: bool
    call: Callable[[Mapping[str, Any]], None] | None
    where: Mapping[str, Any]
    times: int | None  # None: every matching hit
    after: int  # let this many matching hits pass first
    gate: threading.Event | None  # block until it is set (bounded by gate_timeout_s)
    gate_timeout_s: float


class FaultInjector:
    """A thread-safe table of faults keyed by point name (one rule per point).

    ``hits(point)`` counts every time the library reached a point, ``fired(point)`` the times an
    armed rule acted there. Thread-safe; a rule's actions run outside the lock.
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
        kill: bool = False,
        stop: bool = False,
        corrupt: bool = False,
        call: Callable[[Mapping[str, Any]], None] | None = None,
        where: Mapping[str, Any] | None = None,
        times: int | None = 1,
        after: int = 0,
        gate: threading.Event | None = None,
        gate_timeout_s: float = 60.0,
    ) -> None:
        """Arms ``point``: its next ``times`` hits whose context matches ``where`` (after ``after``
        matching ones pass clean) get the rule's actions. ``times=None`` arms every matching hit.

        Raises:
            ValueError: an unknown point, or inconsistent arguments (the message says which).
        """
        if point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; known points: {', '.join(POINTS)}")
        if delay_s < 0 or (times is not None and times < 1) or after < 0:
            raise ValueError("delay_s and after must be >= 0 and times >= 1 (or None)")
        if corrupt and (error is not None or kill or stop):
            raise ValueError(
                "corrupt=True hands the damage to the caller: it takes no other action"
            )
        if corrupt and point not in CORRUPTIBLE:
            raise ValueError(
                f"point {point!r} cannot corrupt what it handles; corrupt=True works at "
                f"{', '.join(sorted(CORRUPTIBLE))}"
            )
        with self._lock:
            self._rules[point] = _Rule(
                error=error,
                delay_s=delay_s,
                kill=kill,
                stop=stop,
                corrupt=corrupt,
                call=call,
                where=dict(where or {}),
                times=times,
                after=after,
                gate=gate,
                gate_timeout_s=gate_timeout_s,
            )

    def clear(self, point: str | None = None) -> None:
        """Disarms one point, or every point."""
        with self._lock:
            if point is None:
                self._rules.clear()
            else:
                self._rules.pop(point, None)

    def fired(self, point: str) -> int:
        """How many times a rule acted at ``point``."""
        with self._lock:
            return self._fired.get(point, 0)

    def hits(self, point: str) -> int:
        """How many times ``point`` was reached, faulty or not."""
        with self._lock:
            return self._hits.get(point, 0)

    def hit(self, point: str, **context: Any) -> bool:
        """Called by the library at ``point``. Applies a matching armed rule (see the module
        docstring) and returns True if the caller must corrupt what it is about to send or write."""
        with self._lock:
            self._hits[point] = self._hits.get(point, 0) + 1
            rule = self._rules.get(point)
            if rule is None or any(context.get(k) != v for k, v in rule.where.items()):
                return False
            if rule.after > 0:
                rule.after -= 1
                return False
            if rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    del self._rules[point]
            self._fired[point] = self._fired.get(point, 0) + 1
        if rule.corrupt:
            return True
        if rule.gate is not None:
            rule.gate.wait(rule.gate_timeout_s)
        if rule.delay_s:
            time.sleep(rule.delay_s)
        if rule.call is not None:
            rule.call(context)
        if rule.stop:
            os.kill(os.getpid(), signal.SIGSTOP)
            threading.Event().wait()  # never let the guarded bytes out, even if the stop is late
        if rule.kill:
            os._exit(KILLED_EXIT_CODE)
        if rule.error is not None:
            raise rule.error
        return False


def damaged(data: bytes | bytearray | memoryview | list[memoryview]) -> bytearray:
    """A copy of ``data`` (one buffer, or the parts of one) with its middle byte flipped: what a
    point armed with ``corrupt=True`` sends or writes in its place. The original is left alone."""
    parts = data if isinstance(data, list) else [data]
    out = bytearray(b"".join(memoryview(p).cast("B") for p in parts))
    if out:
        out[len(out) // 2] ^= 0x5A
    return out
