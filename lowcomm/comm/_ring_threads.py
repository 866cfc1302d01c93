"""The threads of one ring operation, and waiting for them to end without trusting ``Thread.join``.

A ring op's caller must not return while a ring thread can still write into the op's buffers
(the caller's tensor among them). ``Thread.join`` and ``is_alive`` cannot be trusted for that
once a join was interrupted: on CPython 3.11 and 3.12, a ``KeyboardInterrupt`` raised inside
``Thread.join`` marks the joined thread stopped although it still runs (the handling added for
bpo-45274 releases the thread's own state lock), so ``is_alive()`` says False and every later join
returns at once; 3.13 joins through a thread handle and stays right. So each thread here sets its
own events instead: ``began`` as its first act, ``ended`` as its last, and the caller waits on
those (``Event.wait`` may be interrupted and waited on again: the event stays true).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["OpThreads"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    name: str
    began: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    # Whether start() returned: if it was interrupted, the thread may or may not exist.
    started: bool = False


class OpThreads:
    """The daemon threads started for one operation (``start``) and their ends (``wait``)."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def start(self, target: Callable[[], None], name: str) -> None:
        """Runs ``target`` on a new daemon thread. Recorded before the thread exists, so that an
        interrupted call still leaves the thread, if it started, waited for."""
        entry = _Entry(name)
        self._entries.append(entry)

        def body() -> None:
            entry.began.set()
            try:
                target()
            finally:
                entry.ended.set()

        threading.Thread(target=body, name=name, daemon=True).start()
        entry.started = True

    def wait(self, deadline: float) -> bool:
        """Waits until every thread has ended or ``deadline`` (``time.monotonic``) passes;
        whether all ended. A thread whose ``start`` was interrupted and that has not begun is
        not waited for: the caller must first have failed the op, so that a target that begins
        after that returns without touching anything (``RingPipeline`` checks its error first).
        An interrupt raises out of here; calling again resumes the wait."""
        for entry in self._entries:
            if not entry.started and not entry.began.is_set():
                continue
            if not entry.ended.wait(max(deadline - time.monotonic(), 0)):
                return False
        return True

    def wait_past(self, deadline: float, grace_s: float, overdue: Callable[[], None]) -> bool:
        """``wait`` until ``deadline``; past it calls ``overdue`` (which fails the op: its links
        aborted, what is left of the threads is CPU work, which ends) and waits on without bound,
        warning every 5 s after ``grace_s`` more. Whether the deadline passed."""
        if self.wait(deadline):
            return False
        overdue()
        if not self.wait(deadline + grace_s):
            while not self.wait(time.monotonic() + 5.0):
                logger.warning(
                    "threads still running after the op failed, waiting: %s",
                    ", ".join(self.running()),
                )
        return True

    def running(self) -> list[str]:
        """The names of the threads that have not ended (as ``wait`` counts them)."""
        return [
            e.name
            for e in self._entries
            if not e.ended.is_set() and (e.started or e.began.is_set())
        ]
