"""Lazy staging: a background thread copies the state's tensors into reused host buffers.

``save`` only records which tensors to copy (and, on CUDA, an event on the caller's stream); the
copier thread does the copy while the next forward/backward runs, on a side CUDA stream into pinned
buffers, and the training thread waits for it only at ``wait_until_safe_to_mutate``. Buffers are
allocated once and reused across checkpoints; when every buffer is still held (the newest snapshot
kept in host memory, the previous one still being written), the copier waits for one to be released:
that is the back-pressure that slows training only when storage cannot keep up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lowcomm._tensors import byte_array
from lowcomm.checkpoint._format import TensorEntry, align
from lowcomm.checkpoint._state import TensorRef
from lowcomm.checkpoint.errors import CheckpointError, CheckpointTimeoutError
from lowcomm.faults import FaultInjector

logger = logging.getLogger(__name__)

__all__ = ["HostBuffer", "HostBufferPool", "Snapshot", "Stager", "lower_thread_priority"]

# CPU tensors are copied in slices of this size by one thread (numpy, GIL released), not by
# torch's copy_, which fans out to intra-op threads that compete with training's on every core.
_CPU_SLICE_BYTES = 8 << 20


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's niceness by ``nice`` (Linux: a thread is a task with its own
    nice value). A no-op elsewhere or on failure: only the scheduling of this thread changes."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:
        logger.debug("could not lower the priority of %s: %s", threading.current_thread().name, e)


def _copy_cpu(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for contiguous CPU tensors of one dtype, in slices on this thread."""
    if not (src.is_contiguous() and src.dtype == dst.dtype and src.device.type == "cpu"):
        with torch.no_grad():
            dst.copy_(src)
        return
    a, b = byte_array(dst), byte_array(src.detach())
    for lo in range(0, b.size, _CPU_SLICE_BYTES):
        np.copyto(a[lo : lo + _CPU_SLICE_BYTES], b[lo : lo + _CPU_SLICE_BYTES])


class HostBuffer:
    """One reusable host buffer (pinned when staging from CUDA). Held while ``holders > 0``."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.data: torch.Tensor | None = None
        self.holders = 0


class HostBufferPool:
    """A fixed number of host buffers; ``acquire`` blocks until one is free (back-pressure).

    Thread-safe. A buffer is grown (reallocated) only when a snapshot does not fit in it.
    """

    def __init__(self, num_buffers: int) -> None:
        self._cond = threading.Condition()
        self._buffers = [HostBuffer(i) for i in range(num_buffers)]
        self.num_allocations = 0

    def acquire(self, nbytes: int, *, holders: int, pin: bool, timeout_s: float) -> HostBuffer:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                free = [b for b in self._buffers if b.holders == 0]
                if free:
                    # Prefer a buffer that already fits, so steady state allocates nothing.
                    fits = [b for b in free if b.data is not None and b.data.numel() >= nbytes]
                    buf = fits[0] if fits else free[0]
                    buf.holders = holders
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckpointTimeoutError(
                        f"no host buffer was released within {timeout_s:.0f} s: storage is not "
                        "keeping up with the checkpoint frequency"
                    )
                self._cond.wait(left)
        if buf.data is None or buf.data.numel() < nbytes or (pin and not buf.data.is_pinned()):
            buf.data = None  # free the old one before allocating the new one
            buf.data = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
            self.num_allocations += 1
        return buf

    def prepare(self, nbytes: int, *, pin: bool) -> None:
        """Allocate and touch every free buffer too small for ``nbytes`` (copier thread, between
        copies): later checkpoints then reuse warm memory instead of faulting in fresh pages,
        which under memory pressure took seconds here."""
        with self._cond:
            todo = [
                b
                for b in self._buffers
                if b.holders == 0 and (b.data is None or b.data.numel() < nbytes)
            ]
            for b in todo:
                b.holders += 1  # hold while preparing outside the lock
        for b in todo:
            b.data = None
            b.data = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
            b.data.zero_()
            self.num_allocations += 1
            self.release(b)

    def hold(self, buf: HostBuffer) -> None:
        """Add a holder to a buffer that already has one (a reader of the host snapshot)."""
        with self._cond:
            if buf.holders <= 0:
                raise RuntimeError("cannot hold a free host buffer")
            buf.holders += 1

    def release(self, buf: HostBuffer) -> None:
        with self._cond:
            if buf.holders <= 0:
                raise RuntimeError("host buffer released more often than acquired")
            buf.holders -= 1
            if buf.holders == 0:
                self._cond.notify_all()


@dataclass
class Snapshot:
    """One requested checkpoint of one rank, as it moves through copy, host, local and remote."""

    step: int
    skeleton: bytes
    metadata: dict[str, Any]
    entries: list[TensorEntry]
    total_bytes: int
    levels: tuple[str, ...]
    refs: list[TensorRef] | None
    cuda_event: Any = None  # torch.cuda.Event recorded on the saving thread's stream
    handle: Any = None  # the SaveHandle the Checkpointer reports progress to
    buffer: HostBuffer | None = None
    manifest: bytes | None = None  # set once committed at the local level; the remote puts it
    copied_bytes: int = 0  # a prefix of the layout that is in the host buffer
    copy_error: BaseException | None = None
    direct: Any = None  # a DirectWrite when the local level writes from the live tensors
    copy_done: threading.Event = field(default_factory=threading.Event)
    progress: threading.Condition = field(default_factory=threading.Condition)

    def wait_copied(self, upto: int, *, timeout_s: float) -> None:
        """Block until the first ``upto`` bytes are in the host buffer; raise if the copy failed."""
        deadline = time.monotonic() + timeout_s
        with self.progress:
            while self.copied_bytes < upto and self.copy_error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckpointTimeoutError(f"step {self.step}: copy did not progress in time")
                self.progress.wait(left)
            if self.copy_error is not None:
                raise CheckpointError(f"step {self.step}: copy failed: {self.copy_error}")

    def host_view(self) -> memoryview:
        assert self.buffer is not None and self.buffer.data is not None
        return self.buffer.data.numpy().data[: self.total_bytes]


def plan_layout(refs: list[TensorRef]) -> tuple[list[TensorEntry], int]:
    """Offsets of each tensor in the host buffer (64-byte aligned); cheap, no data touched."""
    entries = []
    offset = 0
    for ref in refs:
        t = ref.tensor
        nbytes = t.numel() * t.element_size()
        entries.append(
            TensorEntry(
                key=ref.key,
                dtype=str(t.dtype),
                shape=list(t.shape),
                offset=offset,
                nbytes=nbytes,
                dtensor=ref.dtensor,
            )
        )
        offset = align(offset + nbytes)
    return entries, offset


def host_tensor(buf: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The tensor ``entry`` describes, as a view into a uint8 host buffer."""
    dtype = getattr(torch, entry.dtype.removeprefix("torch."))
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {entry.dtype!r} in checkpoint")
    raw = buf[entry.offset : entry.offset + entry.nbytes]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    return raw.view(dtype).view(entry.shape)


class Stager:
    """The copier thread. ``submit`` is called by the training thread; the rest runs in background.

    ``on_buffer(snapshot)`` is called from the copier thread once a buffer is assigned (the local
    writer starts streaming from there); ``on_copied(snapshot)`` once the copy is complete. The
    buffer is acquired with one hold for the copier and one for each of the snapshot's levels in
    ``buffer_levels`` (those that read it); each releases its own.
    """

    def __init__(
        self,
        *,
        pool: HostBufferPool,
        faults: FaultInjector,
        on_buffer: Any,
        on_copied: Any,
        buffer_levels: frozenset[str],
        buffer_timeout_s: float,
        nice: int = 0,
    ) -> None:
        self._nice = nice
        self._buffer_levels = buffer_levels
        self._pool = pool
        self._faults = faults
        self._on_buffer = on_buffer
        self._on_copied = on_copied
        self._buffer_timeout_s = buffer_timeout_s
        self._queue: list[Snapshot | None] = []
        self._cond = threading.Condition()
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name="lowcomm-ckpt-copy", daemon=True)
        self._thread.start()

    def submit(self, snap: Snapshot) -> None:
        with self._cond:
            self._queue.append(snap)
            self._cond.notify_all()

    def close(self, *, timeout_s: float) -> None:
        with self._cond:
            self._queue.append(None)
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        lower_thread_priority(self._nice)
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                snap = self._queue.pop(0)
            if snap is None:
                return
            try:
                self._copy(snap)
            except BaseException as e:  # surfaced through the snapshot, never kills the thread
                logger.error("checkpoint step %d: copy to host failed: %s", snap.step, e)
                with snap.progress:
                    snap.copy_error = e
                    snap.progress.notify_all()
            finally:
                snap.refs = None  # drop references to the training tensors
                snap.copy_done.set()
            try:
                self._on_copied(snap)
            except BaseException:
                logger.exception("checkpoint step %d: post-copy hook failed", snap.step)
            if snap.copy_error is None and snap.buffer is not None:
                with self._cond:
                    idle = not self._queue
                if idle:  # never delays a queued copy
                    try:
                        self._pool.prepare(
                            snap.total_bytes,
                            pin=snap.buffer.data is not None and snap.buffer.data.is_pinned(),
                        )
                    except RuntimeError as e:  # out of memory: allocate on demand later
                        logger.warning("could not pre-allocate host buffers: %s", e)

    def _copy(self, snap: Snapshot) -> None:
        assert snap.refs is not None
        cuda = any(r.tensor.is_cuda for r in snap.refs)
        holders = 1 + sum(1 for lvl in snap.levels if lvl in self._buffer_levels)
        snap.buffer = self._pool.acquire(
            snap.total_bytes, holders=holders, pin=cuda, timeout_s=self._buffer_timeout_s
        )
        self._on_buffer(snap)
        assert snap.buffer.data is not None
        buf = snap.buffer.data
        pending: list[tuple[Any, int]] = []  # (cuda event, end offset) not yet published
        if cuda:
            device = next(r.tensor.device for r in snap.refs if r.tensor.is_cuda)
            if self._stream is None or self._stream.device != device:
                self._stream = torch.cuda.Stream(device=device)
            # The copies must see the values as of save(): order them after the saving stream.
            self._stream.wait_event(snap.cuda_event)
            with torch.cuda.device(device):
                self._copy_all(snap, buf, pending)
        else:
            self._copy_all(snap, buf, pending)

    def _copy_all(self, snap: Snapshot, buf: torch.Tensor, pending: list[tuple[Any, int]]) -> None:
        """Copy every tensor; CUDA copies are queued on the side stream without waiting, and
        progress (a copied prefix of the layout) is published as their events complete."""
        assert snap.refs is not None
        for ref, entry in zip(snap.refs, snap.entries, strict=True):
            self._faults.hit("copy")
            end = entry.offset + entry.nbytes
            if entry.nbytes and ref.tensor.is_cuda:
                with torch.cuda.stream(self._stream):
                    host_tensor(buf, entry).copy_(ref.tensor, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self._stream)
                pending.append((ev, end))
            else:
                if entry.nbytes:  # CPU tensors: one thread, in slices
                    _copy_cpu(host_tensor(buf, entry), ref.tensor)
                pending.append((None, end))
            self._poll(snap, pending)
        self._drain(snap, pending)
        self._publish(snap, snap.total_bytes)

    def _poll(self, snap: Snapshot, pending: list[tuple[Any, int]]) -> None:
        done = 0
        for ev, _ in pending:
            if ev is not None and not ev.query():
                break
            done += 1
        if done:
            self._publish(snap, pending[done - 1][1])
            del pending[:done]

    def _drain(self, snap: Snapshot, pending: list[tuple[Any, int]]) -> None:
        for ev, end in pending:
            if ev is not None:
                ev.synchronize()
            self._publish(snap, end)
        pending.clear()

    @staticmethod
    def _publish(snap: Snapshot, upto: int) -> None:
        with snap.progress:
            snap.copied_bytes = max(snap.copied_bytes, upto)
            snap.progress.notify_all()
