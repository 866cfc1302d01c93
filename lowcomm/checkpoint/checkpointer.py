"""``Checkpointer``: lazy asynchronous multi-level checkpoints (host memory, local disk, remote).

A training loop adds two lines::

    for step in range(start, num_steps):
        loss = model(batch).loss; loss.backward()
        ckpt.wait_until_safe_to_mutate()   # 1: blocks only if the last save's copy is unfinished
        optimizer.step(); optimizer.zero_grad()
        if step % 100 == 0:
            ckpt.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict(),
                             "rng": torch.get_rng_state(), "data": loader_position})  # 2: returns at once

``save`` records references to the tensors; a copier thread copies them to reused host buffers
while the next forward/backward runs (parameters and optimizer state do not change until
``optimizer.step``), a writer thread streams the copied bytes to local disk and commits them, and an
uploader thread puts the committed files on remote storage. Failures of a level never stop training:
they are logged, kept in ``pop_failures()``, raised by ``SaveHandle.wait`` for that level, and (with
``raise_on_failure=True``) raised by the next ``save``/``wait_until_safe_to_mutate``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from lowcomm.checkpoint import _format as fmt
from lowcomm.checkpoint._state import copy_into, flatten_state, unflatten_state
from lowcomm.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointWriteError,
    NoCheckpointError,
)
from lowcomm.checkpoint.staging import HostBufferPool, Snapshot, Stager, host_tensor, plan_layout
from lowcomm.checkpoint.storage import LocalLevel, RemoteLevel
from lowcomm.faults import FaultInjector

logger = logging.getLogger(__name__)

__all__ = ["CheckpointConfig", "CheckpointInfo", "Checkpointer", "RestoreReport", "SaveHandle"]

LEVELS = ("host", "local", "remote")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how to checkpoint.

    Attributes:
        levels: URLs in order, each level optional: ``"host://"`` keeps the newest snapshot in RAM;
            a path or ``file://`` URL is the local disk level; any other fsspec URL after it
            (``s3://bucket/run``) is the remote level, uploaded from local disk, so it needs one.
        remote_options: fsspec storage options for the remote URL (``endpoint_url``, ``key``...).
        keep_last_local, keep_last_remote: committed checkpoints kept per level (newest first).
        keep_every: steps divisible by it are kept forever at local and remote (None: none).
        compression: ``"none"``, ``"zstd"`` or ``"shuffle-zstd"`` for data chunks on disk. ``"none"``
            by default: here zstd ran at 0.22 GB/s per core for a 1.2x gain, slower than the disk.
        zstd_level: zstd level for the compressed modes (1-22).
        chunk_bytes: data is written and checksummed in chunks of this size, in parallel.
        num_io_threads: threads writing/reading chunks.
        num_host_buffers: reused host buffers; 2 lets one be written while the newest is kept.
        commit_timeout_s: how long a rank waits for others' parts, or a write for its copy.
        raise_on_failure: raise a level's write failure from the next ``save`` or
            ``wait_until_safe_to_mutate`` instead of only logging it.
        stream_during_copy: write chunks to disk as soon as they are copied (DataStates-style)
            instead of after the whole copy. Off by default: on a CPU-bound host the writes
            compete with the copy the training thread may be waiting for (measured here: the
            barrier grew while durability barely improved).
    """

    levels: tuple[str, ...] = ("host://",)
    remote_options: dict[str, Any] = field(default_factory=dict)
    keep_last_local: int = 2
    keep_last_remote: int = 2
    keep_every: int | None = None
    compression: str = "none"
    zstd_level: int = 1
    chunk_bytes: int = 16 << 20
    num_io_threads: int = 4
    num_host_buffers: int = 2
    commit_timeout_s: float = 600.0
    raise_on_failure: bool = False
    stream_during_copy: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.levels, str):
            raise ValueError(
                "levels must be a tuple of URLs, e.g. ('host://', '/ckpt', 's3://b/run')"
            )
        if not self.levels:
            raise ValueError("levels must name at least one level")
        self.parsed_levels()  # validates
        for name in ("keep_last_local", "keep_last_remote", "num_io_threads", "num_host_buffers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be None or >= 1, got {self.keep_every}")
        if self.compression not in fmt.CODECS:
            raise ValueError(f"compression must be one of {fmt.CODECS}, got {self.compression!r}")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level must be in [1, 22], got {self.zstd_level}")
        if self.chunk_bytes < 4096 or self.chunk_bytes % 64:
            raise ValueError(
                f"chunk_bytes must be >= 4096 and a multiple of 64, got {self.chunk_bytes}"
            )
        if self.commit_timeout_s <= 0:
            raise ValueError(f"commit_timeout_s must be > 0, got {self.commit_timeout_s}")

    def parsed_levels(self) -> dict[str, str]:
        """Map level name (host/local/remote) to its URL or path."""
        out: dict[str, str] = {}
        for url in self.levels:
            if url in ("host://", "host"):
                if out:
                    raise ValueError("'host://' must be the first level")
                out["host"] = url
            elif "local" not in out:
                if "://" in url and not url.startswith("file://"):
                    raise ValueError(
                        f"level {url!r}: the level after host must be a local path or file:// URL "
                        "(remote levels upload from local disk)"
                    )
                out["local"] = url.removeprefix("file://")
            elif "remote" not in out:
                out["remote"] = url
            else:
                raise ValueError(f"too many levels: {self.levels!r} (at most host, local, remote)")
        return out


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its step and the levels that hold it (fastest first)."""

    step: int
    levels: tuple[str, ...]


@dataclass(frozen=True)
class RestoreReport:
    """What ``restore`` loaded, and every (step, level) it skipped with the reason."""

    step: int
    level: str
    skipped: tuple[str, ...]
    metadata: dict[str, Any]


class SaveHandle:
    """The progress of one ``save`` through its levels. Thread-safe."""

    def __init__(self, step: int, levels: tuple[str, ...]) -> None:
        self.step = step
        self.levels = levels
        self._events = {lvl: threading.Event() for lvl in levels}
        self._errors: dict[str, BaseException] = {}
        self.committed_at: dict[str, float] = {}  # time.monotonic() when each level committed

    def _finish(self, level: str, error: BaseException | None = None) -> None:
        if error is not None:
            self._errors[level] = error
        else:
            self.committed_at.setdefault(level, time.monotonic())
        self._events[level].set()

    def done(self, level: str) -> bool:
        return self._events[self._check(level)].is_set()

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


class Checkpointer:
    """Lazy asynchronous multi-level checkpointing for one rank.

    Contract: one training thread calls ``save`` and ``wait_until_safe_to_mutate`` (they are not
    meant to be called concurrently from several threads); ``checkpoints``/``restore`` may be called from
    it too. With ``world_size > 1`` every rank creates a Checkpointer over the same level URLs, every
    rank calls ``save`` for the same steps with its own (sharded) state, and every rank calls
    ``restore`` (it agrees on a step through ``torch.distributed`` when it is initialized).
    Restoring needs the same world size and sharding as the save.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        faults: FaultInjector | None = None,
        process_group: Any = None,
    ) -> None:
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist_on else 0)
        self.world_size = (
            world_size
            if world_size is not None
            else (torch.distributed.get_world_size() if dist_on else 1)
        )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got {self.rank} of {self.world_size}"
            )
        self.config = config
        self.faults = faults or FaultInjector()
        self._group = process_group
        urls = config.parsed_levels()
        self.levels = tuple(lvl for lvl in LEVELS if lvl in urls)
        if "host" in urls and config.num_host_buffers < 2:
            raise ValueError(
                "num_host_buffers must be >= 2 with the host level: one keeps the newest snapshot"
            )
        self._io_pool = ThreadPoolExecutor(
            config.num_io_threads, thread_name_prefix="lowcomm-ckpt-io"
        )
        self.local: LocalLevel | None = None
        self.remote: RemoteLevel | None = None
        if "local" in urls:
            self.local = LocalLevel(
                urls["local"],
                rank=self.rank,
                world_size=self.world_size,
                pool=self._io_pool,
                faults=self.faults,
                chunk_bytes=config.chunk_bytes,
                compression=config.compression,
                zstd_level=config.zstd_level,
                commit_timeout_s=config.commit_timeout_s,
                stream_during_copy=config.stream_during_copy,
            )
        if "remote" in urls:
            self.remote = RemoteLevel(
                urls["remote"],
                rank=self.rank,
                world_size=self.world_size,
                pool=self._io_pool,
                faults=self.faults,
                storage_options=dict(config.remote_options),
                commit_timeout_s=config.commit_timeout_s,
            )
        self._lock = threading.Lock()
        self._host_snap: Snapshot | None = None
        self._pending_copies: list[Snapshot] = []
        self._handles: dict[int, SaveHandle] = {}
        self._failures: list[CheckpointWriteError] = []
        self._unreported: list[CheckpointWriteError] = []
        self.last_restore: RestoreReport | None = None
        self._pool = HostBufferPool(config.num_host_buffers)
        self._local_q: queue.Queue[tuple[Snapshot, SaveHandle] | None] = queue.Queue()
        self._remote_q: queue.Queue[tuple[int, bytes, SaveHandle] | None] = queue.Queue()
        self._stager = Stager(
            pool=self._pool,
            faults=self.faults,
            on_buffer=self._on_buffer,
            on_copied=self._on_copied,
            buffer_timeout_s=config.commit_timeout_s,
        )
        self._local_thread = threading.Thread(
            target=self._local_loop, name="lowcomm-ckpt-local", daemon=True
        )
        self._remote_thread = threading.Thread(
            target=self._remote_loop, name="lowcomm-ckpt-remote", daemon=True
        )
        self._local_thread.start()
        self._remote_thread.start()
        self._closed = False

    # ---- the training thread's calls -----------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        levels: Iterable[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SaveHandle:
        """Start checkpointing ``state`` as ``step``; returns at once with a ``SaveHandle``.

        Non-blocking: tensors are referenced, not copied (do not change them before calling
        ``wait_until_safe_to_mutate``); plain values are pickled now. ``levels`` picks a subset of
        the configured levels (default: all). ``metadata`` (JSON-serializable) goes into the
        manifest. Raises ``ValueError`` on bad input.
        """
        self._surface_failures()
        if self._closed:
            raise CheckpointError("this Checkpointer is closed")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        chosen = (
            self.levels if levels is None else tuple(lvl for lvl in LEVELS if lvl in set(levels))
        )
        unknown = set(levels or ()) - set(self.levels)
        if unknown or not chosen:
            raise ValueError(f"levels must be a non-empty subset of {self.levels}, got {levels!r}")
        if "remote" in chosen and "local" not in chosen:
            raise ValueError("the remote level uploads the local files: save to 'local' as well")
        meta = dict(metadata or {})
        try:
            json.dumps(meta)
        except TypeError as e:
            raise ValueError(f"metadata must be JSON-serializable: {e}") from e
        with self._lock:
            old = self._handles.get(step)
            if old is not None and not all(old.done(lvl) for lvl in old.levels):
                raise ValueError(f"step {step} is already being saved")
        skeleton, refs = flatten_state(state)
        entries, total = plan_layout(refs)
        event = None
        cuda_devices = {r.tensor.device for r in refs if r.tensor.is_cuda}
        if len(cuda_devices) > 1:
            raise ValueError(
                f"state holds tensors on several GPUs {sorted(map(str, cuda_devices))}"
            )
        if cuda_devices:
            # Cheap: marks the point on the training stream the side-stream copies must follow.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(next(iter(cuda_devices))))
        snap = Snapshot(
            step=step,
            skeleton=skeleton,
            metadata=meta,
            entries=entries,
            total_bytes=total,
            levels=chosen,
            refs=refs,
            cuda_event=event,
        )
        handle = SaveHandle(step, chosen)
        snap.handle = handle
        with self._lock:
            # Forget finished saves so the table stays small over a long run.
            for s, h in list(self._handles.items()):
                if all(h.done(lvl) for lvl in h.levels):
                    del self._handles[s]
            self._handles[step] = handle
            self._pending_copies.append(snap)
        self._stager.submit(snap)
        return handle

    def wait_until_safe_to_mutate(self, timeout_s: float = 600.0) -> None:
        """Block until every saved tensor has been copied; call right before ``optimizer.step()``.

        Returns at once when the copies are done (the common case: they ran during forward and
        backward). Raises ``CheckpointTimeoutError`` after ``timeout_s``. A failed copy does not
        raise here (the tensors are free to change either way); it is reported as a failure.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            pending = list(self._pending_copies)
        for snap in pending:
            if not snap.copy_done.wait(max(0.0, deadline - time.monotonic())):
                raise CheckpointTimeoutError(
                    f"the copy of step {snap.step} did not finish within {timeout_s} s"
                )
        with self._lock:
            self._pending_copies = [s for s in self._pending_copies if not s.copy_done.is_set()]
        self._surface_failures()

    def pop_failures(self) -> list[CheckpointWriteError]:
        """Level write failures since the last call (each names its step and level)."""
        with self._lock:
            out, self._failures = self._failures, []
        return out

    def wait(self, timeout_s: float = 600.0) -> None:
        """Block until every save so far finished at every level (committed or failed)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            for lvl in h.levels:
                if not h._events[lvl].wait(max(0.0, deadline - time.monotonic())):
                    raise CheckpointTimeoutError(
                        f"step {h.step} at {lvl} not finished in {timeout_s} s"
                    )

    def close(self, timeout_s: float = 600.0) -> None:
        """Finish in-flight saves (up to ``timeout_s``), then stop the background threads."""
        if self._closed:
            return
        try:
            self.wait(timeout_s)
        finally:
            self._closed = True
            self._stager.close(timeout_s=timeout_s)
            self._local_q.put(None)
            self._remote_q.put(None)
            self._local_thread.join(timeout_s)
            self._remote_thread.join(timeout_s)
            self._io_pool.shutdown(wait=False)
            with self._lock:
                self._host_snap = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- listing and restore -------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints of this rank's levels, oldest first (no verification)."""
        where: dict[int, list[str]] = {}
        for lvl, steps in self._level_steps().items():
            for s in steps:
                where.setdefault(s, []).append(lvl)
        return [CheckpointInfo(step=s, levels=tuple(where[s])) for s in sorted(where)]

    def _level_steps(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        with self._lock:
            host = self._host_snap
        if host is not None:
            out["host"] = [host.step]
        if self.local is not None:
            out["local"] = self.local.steps()
        if self.remote is not None:
            try:
                out["remote"] = self.remote.steps()
            except Exception as e:  # unreachable remote: list what is reachable
                logger.warning("cannot list remote checkpoints at %s: %s", self.remote.url, e)
                out["remote"] = []
        return out

    def restore(
        self,
        step: int | None = None,
        *,
        into: Any = None,
        levels: Iterable[str] | None = None,
    ) -> Any:
        """Load the newest complete, verified checkpoint (or ``step``) and return its state.

        Tries levels fastest first (host, local, remote); a checkpoint that fails verification
        (checksum, size, manifest) is skipped for the next level, then the previous step, and every
        skip is logged and listed in ``self.last_restore.skipped``. With ``into`` (for example
        ``{"model": model.state_dict(), ...}`` of DTensors) tensors are copied into it in place and
        it is returned; otherwise fresh CPU tensors are returned (DTensors as their local shard).
        Every rank must call it when ``world_size > 1``. Raises ``NoCheckpointError`` when nothing
        valid is left.
        """
        allowed = set(levels) if levels is not None else set(self.levels)
        by_level = {k: v for k, v in self._level_steps().items() if k in allowed}
        candidates = sorted({s for v in by_level.values() for s in v}, reverse=True)
        if step is not None:
            candidates = [s for s in candidates if s == step]
        candidates = self._agree_candidates(candidates)
        skipped: list[str] = []
        for s in candidates:
            result = None
            for lvl in LEVELS:
                if s not in by_level.get(lvl, []):
                    continue
                try:
                    result = (lvl, *self._load(lvl, s, into))
                    break
                except (CheckpointCorruptError, OSError, ValueError, KeyError) as e:
                    msg = f"step {s} at {lvl}: {type(e).__name__}: {e}"
                    logger.warning("restore skipped %s", msg)
                    skipped.append(msg)
                except Exception as e:  # remote errors come in many types (botocore, aiohttp)
                    msg = f"step {s} at {lvl}: {type(e).__name__}: {e}"
                    logger.warning("restore skipped %s", msg)
                    skipped.append(msg)
            if not self._all_ranks_ok(result is not None):
                if result is not None:
                    skipped.append(f"step {s}: another rank could not load its part")
                continue
            assert result is not None
            lvl, state, meta = result
            self.last_restore = RestoreReport(
                step=s, level=lvl, skipped=tuple(skipped), metadata=meta
            )
            logger.info("restored step %d from %s (skipped %d)", s, lvl, len(skipped))
            return state
        reasons = "; ".join(skipped) or "no committed checkpoint found"
        raise NoCheckpointError(f"nothing to restore (levels {sorted(allowed)}): {reasons}")

    def _load(self, level: str, step: int, into: Any) -> tuple[Any, dict[str, Any]]:
        """Load one (level, step); with ``into``, the result is already copied into it."""
        if level == "host":
            with self._lock:
                snap = self._host_snap
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
                state = unflatten_state(snap.skeleton, tensors)
                if into is not None:
                    state = copy_into(into, state)
            finally:
                self._pool.release(snap.buffer)
            return state, dict(snap.metadata)
        source = self.local if level == "local" else self.remote
        assert source is not None
        dests = None
        if into is not None:
            # Read straight into the template's own tensors (its parameters, its moments).
            dests = {ref.key: ref.tensor for ref in flatten_state(into)[1]}
        body, (tensors, skeleton) = source.load(step, dests=dests)
        state = unflatten_state(skeleton, tensors)
        if into is not None:
            state = copy_into(into, state)
        return state, dict(body.get("metadata", {}))

    def _dist(self) -> bool:
        return (
            self.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        )

    def _agree_candidates(self, candidates: list[int]) -> list[int]:
        if not self._dist():
            return candidates
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, candidates, group=self._group)
        return sorted({s for c in gathered for s in c}, reverse=True)

    def _all_ranks_ok(self, ok: bool) -> bool:
        if not self._dist():
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self._group)
        return bool(flag.item())

    # ---- background pipeline -------------------------------------------------------------------

    @staticmethod
    def _handle_of(snap: Snapshot) -> SaveHandle:
        handle: SaveHandle = snap.handle
        return handle

    def _on_buffer(self, snap: Snapshot) -> None:
        # Called by the copier once the buffer is assigned: the writer streams behind the copy.
        if "local" in snap.levels:
            self._local_q.put((snap, self._handle_of(snap)))

    def _on_copied(self, snap: Snapshot) -> None:
        handle = self._handle_of(snap)
        buf = snap.buffer
        if snap.copy_error is not None:
            err = CheckpointWriteError(
                f"checkpoint step {snap.step}: copy to host failed: {snap.copy_error}",
                step=snap.step,
                level="host",
            )
            for lvl in snap.levels:
                if lvl in ("local", "remote") and buf is not None:
                    continue  # the writer was started: it sees the copy error and fails these
                self._fail(handle, lvl, err)
            if buf is not None and "host" in snap.levels:
                self._pool.release(buf)
        elif "host" in snap.levels:
            with self._lock:
                previous, self._host_snap = self._host_snap, snap
            if previous is not None and previous.buffer is not None:
                self._pool.release(previous.buffer)
            handle._finish("host")
        if buf is not None:
            self._pool.release(buf)  # the copier's own hold

    def _local_loop(self) -> None:
        while True:
            item = self._local_q.get()
            if item is None:
                return
            snap, handle = item
            assert self.local is not None and snap.buffer is not None
            try:
                blob = self.local.write(snap)
            except BaseException as e:
                err = (
                    e
                    if isinstance(e, CheckpointWriteError)
                    else CheckpointWriteError(
                        f"checkpoint step {snap.step} at local: {e}", step=snap.step, level="local"
                    )
                )
                self._fail(handle, "local", err)
                if "remote" in snap.levels:
                    self._fail(
                        handle,
                        "remote",
                        CheckpointWriteError(
                            f"checkpoint step {snap.step} not uploaded: the local level failed ({e})",
                            step=snap.step,
                            level="remote",
                        ),
                    )
                blob = None
            finally:
                snap.copy_done.wait()  # the copier may still be filling the buffer after a failure
                self._pool.release(snap.buffer)
            if blob is None:
                continue
            handle.committed_at["local"] = time.monotonic()
            self._retain_local(snap.step)  # before signalling, so wait() sees the pruned level
            handle._finish("local")
            if "remote" in snap.levels:
                self._remote_q.put((snap.step, blob, handle))

    def _remote_loop(self) -> None:
        while True:
            item = self._remote_q.get()
            if item is None:
                return
            step, blob, handle = item
            assert self.remote is not None and self.local is not None
            try:
                self.remote.upload(step, self.local, blob)
            except BaseException as e:
                err = (
                    e
                    if isinstance(e, CheckpointWriteError)
                    else CheckpointWriteError(
                        f"checkpoint step {step} at remote: {e}", step=step, level="remote"
                    )
                )
                self._fail(handle, "remote", err)
                continue
            handle.committed_at["remote"] = time.monotonic()
            self._retain_remote(step)
            handle._finish("remote")

    def _fail(self, handle: SaveHandle, level: str, err: CheckpointWriteError) -> None:
        logger.error("%s (training continues; earlier checkpoints are untouched)", err)
        with self._lock:
            self._failures.append(err)
            self._unreported.append(err)
        handle._finish(level, err)

    def _surface_failures(self) -> None:
        with self._lock:
            fresh, self._unreported = self._unreported, []
        for err in fresh:
            logger.error("checkpoint level %s failed for step %d: %s", err.level, err.step, err)
        if fresh and self.config.raise_on_failure:
            raise fresh[0]

    def _keep(self, steps: list[int], keep_last: int) -> set[int]:
        keep = set(steps[-keep_last:])
        if self.config.keep_every is not None:
            keep |= {s for s in steps if s % self.config.keep_every == 0}
        return keep

    def _retain_local(self, committed: int) -> None:
        if self.local is None or self.rank != 0:
            return
        try:
            steps = self.local.steps()
            keep = self._keep(steps, self.config.keep_last_local)
            for s in steps:
                if s not in keep:
                    self.local.delete(s)
            # Directories without a manifest below the newest commit are dead partial writes
            # (a crashed or failed save): every rank finished them before this commit.
            for s in self.local.uncommitted_steps():
                if s < committed:
                    self.local.delete(s)
        except OSError as e:
            logger.warning("local retention failed (will retry after the next commit): %s", e)

    def _retain_remote(self, committed: int) -> None:
        if self.remote is None or self.rank != 0:
            return
        try:
            steps = self.remote.steps()
            keep = self._keep(steps, self.config.keep_last_remote)
            for s in steps:
                if s not in keep:
                    self.remote.delete(s)
        except Exception as e:
            logger.warning("remote retention failed (will retry after the next commit): %s", e)
