"""The background level pipeline: after the copy, each snapshot is committed level by level.

The host level commits on the copier thread as soon as the copy is complete. A snapshot written
directly from the live CPU tensors (``_direct``) skips the copier: it goes to the local writer at
once, and the writer frees its staged copy (if a freeze made one) when it is done. Every other level
(local disk, then remote) has its own writer thread, in order: the first starts when the snapshot's
host buffer is assigned (so it can stream behind the copy), each next one once the previous
committed (the remote level uploads the local files). A level's failure fails the later levels of
that snapshot too, is logged and recorded; it never stops training or the other snapshots.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from lowcomm.checkpoint._retention import prune
from lowcomm.checkpoint.errors import CheckpointWriteError
from lowcomm.checkpoint.handle import SaveHandle
from lowcomm.checkpoint.levels import StorageLevel
from lowcomm.checkpoint.staging import HostBufferPool, Snapshot, lower_thread_priority

logger = logging.getLogger(__name__)

__all__ = ["LevelPipeline"]


class _Writer:
    """One disk level's writer thread and its queue of snapshots."""

    def __init__(
        self, level: StorageLevel, *, keep_last: int, target: Callable[[_Writer], None]
    ) -> None:
        self.level = level
        self.keep_last = keep_last
        self.queue: queue.Queue[Snapshot | None] = queue.Queue()
        self.thread = threading.Thread(
            target=target, args=(self,), name=f"lowcomm-ckpt-{level.name}", daemon=True
        )


class LevelPipeline:
    """Commits snapshots at their levels in the background and keeps the failures. Thread-safe.

    ``on_buffer`` and ``on_copied`` are the copier's callbacks (``Stager``); ``failures`` and
    ``unreported`` are read by the training thread.
    """

    def __init__(
        self,
        *,
        host: StorageLevel | None,
        chain: Sequence[tuple[StorageLevel, int]],
        pool: HostBufferPool,
        rank: int,
        keep_every: int | None,
        nice: int = 0,
    ) -> None:
        """``chain``: the levels after host, in order, each with its ``keep_last``; ``nice``: the
        writer threads' added niceness (``CheckpointConfig.background_nice``)."""
        self._nice = nice
        self._host = host
        self._pool = pool
        self._rank = rank
        self._keep_every = keep_every
        self._lock = threading.Lock()
        self._failures: list[CheckpointWriteError] = []
        self._unreported: list[CheckpointWriteError] = []
        self._writers = [_Writer(lvl, keep_last=k, target=self._run) for lvl, k in chain]
        for w in self._writers:
            w.thread.start()

    # ---- the copier's callbacks ----------------------------------------------------------------

    def on_buffer(self, snap: Snapshot) -> None:
        # Called by the copier once the buffer is assigned: the first writer streams behind the copy.
        self._forward(snap, 0)

    def on_copied(self, snap: Snapshot) -> None:
        handle = _handle_of(snap)
        buf = snap.buffer
        if snap.copy_error is not None:
            err = CheckpointWriteError(
                f"checkpoint step {snap.step}: copy to host failed: {snap.copy_error}",
                step=snap.step,
                level="host",
            )
            for lvl in snap.levels:
                if lvl != "host" and buf is not None:
                    continue  # the writer was started: it sees the copy error and fails these
                self._fail(handle, lvl, err)
            if buf is not None and "host" in snap.levels:
                self._pool.release(buf)
        elif self._host is not None and self._host.name in snap.levels:
            self._host.write(snap)
            handle.finish(self._host.name)
        if buf is not None:
            self._pool.release(buf)  # the copier's own hold

    # ---- writers -------------------------------------------------------------------------------

    def _forward(self, snap: Snapshot, index: int) -> None:
        if index < len(self._writers) and self._writers[index].level.name in snap.levels:
            self._writers[index].queue.put(snap)

    def _run(self, writer: _Writer) -> None:
        level, index = writer.level, self._writers.index(writer)
        lower_thread_priority(self._nice)
        while True:
            snap = writer.queue.get()
            if snap is None:
                return
            handle = _handle_of(snap)
            ok = False
            try:
                level.write(snap)
                ok = True
            except BaseException as e:
                err = (
                    e
                    if isinstance(e, CheckpointWriteError)
                    else CheckpointWriteError(
                        f"checkpoint step {snap.step} at {level.name}: {e}",
                        step=snap.step,
                        level=level.name,
                    )
                )
                self._fail(handle, level.name, err)
                for later in self._writers[index + 1 :]:
                    if later.level.name in snap.levels:
                        self._fail(
                            handle,
                            later.level.name,
                            CheckpointWriteError(
                                f"checkpoint step {snap.step} not written to {later.level.name}: "
                                f"the {level.name} level failed ({e})",
                                step=snap.step,
                                level=later.level.name,
                            ),
                        )
            finally:
                if snap.direct is not None and index == 0:
                    # Written from the live tensors: stop reading them; free the staged copy.
                    snap.direct.abandon()
                    if snap.direct.buffer_handle is not None:
                        self._pool.release(snap.direct.buffer_handle)
                        snap.direct.buffer, snap.direct.buffer_handle = None, None
                elif level.holds_host_buffer:
                    assert snap.buffer is not None
                    snap.copy_done.wait()  # the copier may still fill the buffer after a failure
                    self._pool.release(snap.buffer)
            if not ok:
                continue
            handle.committed_at[level.name] = time.monotonic()
            if self._rank == 0:  # before signalling, so wait() sees the pruned level
                prune(
                    level,
                    committed=snap.step,
                    keep_last=writer.keep_last,
                    keep_every=self._keep_every,
                )
            handle.finish(level.name)
            self._forward(snap, index + 1)

    def close(self, *, timeout_s: float) -> None:
        """Stop the writer threads once their queued snapshots are done (up to ``timeout_s``)."""
        for w in self._writers:
            w.queue.put(None)
        for w in self._writers:
            w.thread.join(timeout_s)

    # ---- failures ------------------------------------------------------------------------------

    def _fail(self, handle: SaveHandle, level: str, err: CheckpointWriteError) -> None:
        logger.error("%s (training continues; earlier checkpoints are untouched)", err)
        with self._lock:
            self._failures.append(err)
            self._unreported.append(err)
        handle.finish(level, err)

    def pop_failures(self) -> list[CheckpointWriteError]:
        """Every failure since the last call."""
        with self._lock:
            out, self._failures = self._failures, []
        return out

    def pop_unreported(self) -> list[CheckpointWriteError]:
        """Failures not yet surfaced to the training thread (``raise_on_failure``)."""
        with self._lock:
            out, self._unreported = self._unreported, []
        return out


def _handle_of(snap: Snapshot) -> SaveHandle:
    handle: SaveHandle = snap.handle
    return handle
