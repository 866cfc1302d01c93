"""The worker thread that runs one communicator's collectives in submission order, and its Handle.

Both backends (``Communicator``, ``PcclCommunicator``) run every collective on one such thread, so
several ``all_reduce_async`` may be in flight while the caller computes and every peer still
executes its phases in the same order. A blocking call runs there too, not on the caller's thread:
a Ctrl-C or the caller's thread-local torch state (default device, inference mode) must never land
in the middle of an op's commit protocol.
``all_reduce_with_retry`` is the bounded retry both backends' methods of that name share.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lowcomm.comm.errors import CommTimeoutError, PeerFailureError, TopologyError

__all__ = ["Handle", "TaskQueue", "all_reduce_with_retry", "deadline_after"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def deadline_after(timeout_s: float | None, default_s: float) -> float:
    """``time.monotonic()`` plus ``timeout_s`` (``default_s`` if None); ValueError unless > 0."""
    t = default_s if timeout_s is None else float(timeout_s)
    if not t > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return time.monotonic() + t


class Handle:
    """An operation running on the communicator's worker thread (``all_reduce_async``, ...)."""

    def __init__(self, future: concurrent.futures.Future[Any], what: str) -> None:
        self._future = future
        self._what = what

    def done(self) -> bool:
        """True once the operation finished (successfully or not). Never blocks."""
        return self._future.done()

    def wait(self, timeout_s: float | None = None) -> Any:
        """Blocks until the operation finished and returns its result or raises its error.

        ``timeout_s=None`` waits for the operation's own timeout (it always has one). Raises
        ``CommTimeoutError`` if ``timeout_s`` passes first; the operation keeps running.
        """
        # Wait first, then take the result: the operation's own CommTimeoutError is a
        # TimeoutError too, and must reach the caller as it was raised, not as this wait's.
        done, _ = concurrent.futures.wait([self._future], timeout=timeout_s)
        if not done:
            raise CommTimeoutError(
                f"{self._what} did not finish within {timeout_s} s (it is still running)"
            )
        return self._future.result()


@dataclass
class _Task:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class TaskQueue:
    """Tasks run one at a time on one daemon thread, in submission order.

    Args:
        name: the thread's name.
        check: called before each task runs (and at submission); raising fails that task, e.g.
            because the communicator was evicted or closed meanwhile.

    Thread-safe. ``close()`` fails every task not yet started with ``TopologyError``.
    """

    def __init__(self, name: str, *, check: Callable[[], None]) -> None:
        self._name = name
        self._check = check
        self._tasks: list[_Task] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Starts the worker thread (once; later calls do nothing)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[float], T], deadline: float, what: str) -> Handle:
        """Queues ``fn(deadline)``; returns its handle. Raises what ``check`` raises."""
        self._check()
        task = _Task(fn=lambda: fn(deadline))
        with self._cond:
            self._tasks.append(task)
            self._cond.notify_all()
        return Handle(task.future, what)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._tasks = self._tasks, []
            self._cond.notify_all()
        for task in pending:
            task.future.set_exception(TopologyError("the communicator was closed"))

    def join(self, timeout_s: float) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._closed:
                    self._cond.wait(0.5)
                if self._closed:
                    return
                task = self._tasks.pop(0)
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                self._check()
                task.future.set_result(task.fn())
            except BaseException as e:
                task.future.set_exception(e)


def all_reduce_with_retry(attempt: Callable[[], T], *, max_attempts: int) -> T:
    """Calls ``attempt`` until it succeeds, at most ``max_attempts`` times, retrying only after a
    peer failure or stall (``PeerFailureError``, ``CommTimeoutError``); re-raises the last error."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    for i in range(1, max_attempts + 1):
        try:
            return attempt()
        except (PeerFailureError, CommTimeoutError) as e:
            if i == max_attempts:
                raise
            logger.warning(
                "all_reduce attempt %d/%d failed (%s); retrying among the survivors",
                i,
                max_attempts,
                e,
            )
    raise AssertionError("unreachable")
