"""``HostLevel``: the newest snapshot, kept in its host buffer (RAM); restoring from it reads no disk."""

from __future__ import annotations

import threading
from typing import Any

from lowcomm.checkpoint._state import restore_state
from lowcomm.checkpoint.errors import CheckpointCorruptError
from lowcomm.checkpoint.staging import HostBufferPool, Snapshot, host_tensor

__all__ = ["HostLevel"]


class HostLevel:
    """Keeps the newest copied snapshot in its host buffer; lost with the process. Thread-safe.

    It keeps one snapshot: writing a new one releases the previous one's buffer to the pool.
    """

    name = "host"
    url = "host://"
    holds_host_buffer = True

    def __init__(self, *, pool: HostBufferPool) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None

    def write(self, snap: Snapshot) -> None:
        """Keep ``snap`` as the newest; never blocks. Called on the copier thread once the copy is
        complete; the hold the copier took for this level passes to the kept snapshot."""
        with self._lock:
            previous, self._snap = self._snap, snap
        if previous is not None and previous.buffer is not None:
            self._pool.release(previous.buffer)

    def steps(self) -> list[int]:
        with self._lock:
            return [] if self._snap is None else [self._snap.step]

    def partial_steps(self) -> list[int]:
        return []  # a snapshot is kept only once its copy is complete

    def load(self, step: int, *, into: Any = None) -> tuple[Any, dict[str, Any]]:
        """The kept snapshot's state (fresh CPU tensors, or copied into ``into``) and metadata.

        Raises ``CheckpointCorruptError`` when a newer snapshot replaced ``step`` meanwhile."""
        with self._lock:
            snap = self._snap
            if snap is None or snap.step != step:
                raise CheckpointCorruptError("the host snapshot was replaced")
            assert snap.buffer is not None and snap.buffer.data is not None
            # Keep the buffer from being reused by a newer copy while it is read.
            self._pool.hold(snap.buffer)
        try:
            buf = snap.buffer.data[: snap.total_bytes]
            if into is None:
                buf = buf.clone()
            tensors = [host_tensor(buf, e) for e in snap.entries]
            state = restore_state(snap.skeleton, tensors, into)
        finally:
            self._pool.release(snap.buffer)
        return state, dict(snap.metadata)

    def delete(self, step: int) -> None:
        """Forget the kept snapshot if it is ``step`` and release its buffer."""
        with self._lock:
            snap = self._snap
            if snap is None or snap.step != step:
                return
            self._snap = None
        if snap.buffer is not None:
            self._pool.release(snap.buffer)
