"""``SaveHandle``: one ``save``'s progress through its levels (committed, failed, or in flight)."""

from __future__ import annotations

import threading
import time

from lowcomm.checkpoint.errors import CheckpointTimeoutError, CheckpointWriteError

__all__ = ["SaveHandle"]


class SaveHandle:
    """The progress of one ``save`` through its levels. Thread-safe."""

    def __init__(self, step: int, levels: tuple[str, ...]) -> None:
        self.step = step
        self.levels = levels
        self._events = {lvl: threading.Event() for lvl in levels}
        self._errors: dict[str, BaseException] = {}
        self.committed_at: dict[str, float] = {}  # time.monotonic() when each level committed

    def finish(self, level: str, error: BaseException | None = None) -> None:
        """Record that ``level`` committed (or failed with ``error``); called by the pipeline."""
        if error is not None:
            self._errors[level] = error
        else:
            self.committed_at.setdefault(level, time.monotonic())
        self._events[level].set()

    def done(self, level: str) -> bool:
        return self._events[self._check(level)].is_set()

    def wait_finished(self, level: str, timeout_s: float) -> bool:
        """Block until ``level`` committed or failed; False after ``timeout_s``. Never raises the
        level's error (``wait`` does)."""
        return self._events[self._check(level)].wait(timeout_s)

    def _check(self, level: str) -> str:
        if level not in self._events:
            raise ValueError(
                f"step {self.step} was not saved to level {level!r} (it has {self.levels})"
            )
        return level

    def wait(self, level: str | None = None, timeout_s: float = 600.0) -> None:
        """Block until ``level`` (default: the slowest requested) committed or failed.

        Raises ``CheckpointWriteError`` if it failed and ``CheckpointTimeoutError`` after timeout_s.
        """
        level = self._check(level or self.levels[-1])
        if not self._events[level].wait(timeout_s):
            raise CheckpointTimeoutError(
                f"step {self.step} not committed at {level} in {timeout_s} s"
            )
        err = self._errors.get(level)
        if err is not None:
            if isinstance(err, CheckpointWriteError):
                raise err
            raise CheckpointWriteError(str(err), step=self.step, level=level) from err

    def error(self, level: str) -> BaseException | None:
        return self._errors.get(self._check(level))
