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
uploader thread puts the committed files on remote storage. CPU state saved to disk without the
host level skips the copy (``CheckpointConfig.staging``): the writer reads the live tensors, and
``wait_until_safe_to_mutate`` copies only the chunks it has not started (``_direct``). Failures of a level never stop training:
they are logged, kept in ``pop_failures()``, raised by ``SaveHandle.wait`` for that level, and (with
``raise_on_failure=True``) raised by the next ``save``/``wait_until_safe_to_mutate``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lowcomm.checkpoint._direct import DirectWrite, can_write_direct
from lowcomm.checkpoint._pipeline import LevelPipeline
from lowcomm.checkpoint._state import flatten_state
from lowcomm.checkpoint.config import LEVELS, CheckpointConfig
from lowcomm.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointWriteError,
    NoCheckpointError,
)
from lowcomm.checkpoint.handle import SaveHandle
from lowcomm.checkpoint.host_level import HostLevel
from lowcomm.checkpoint.levels import StorageLevel
from lowcomm.checkpoint.local_level import LocalLevel
from lowcomm.checkpoint.remote_level import RemoteLevel
from lowcomm.checkpoint.staging import (
    HostBufferPool,
    Snapshot,
    Stager,
    lower_thread_priority,
    plan_layout,
)
from lowcomm.faults import FaultInjector

logger = logging.getLogger(__name__)

__all__ = ["CheckpointInfo", "Checkpointer", "RestoreReport"]


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


class Checkpointer:
    """Lazy asynchronous multi-level checkpointing for one rank.

    Contract: one training thread calls ``save`` and ``wait_until_safe_to_mutate`` (they are not
    meant to be called concurrently from several threads); ``checkpoints``/``restore`` may be
    called from it too. With ``world_size > 1`` every rank creates a Checkpointer over the same
    level URLs, every rank calls ``save`` for the same steps with its own (sharded) state, and every
    rank calls ``restore`` (it agrees on a step through ``torch.distributed`` when it is
    initialized). A checkpoint saved by another number of ranks is restored with ``into=`` (this
    job's sharded state): each rank reads the byte ranges of the saved shards that overlap its own.

    Every level implements ``StorageLevel``; listing and restore go through its verbs, fastest
    level first, and the background ``LevelPipeline`` writes each save to its levels in order.
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
            config.num_io_threads,
            thread_name_prefix="lowcomm-ckpt-io",
            initializer=lower_thread_priority,
            initargs=(config.background_nice,),
        )
        self._pool = HostBufferPool(config.num_host_buffers)
        host: HostLevel | None = None
        chain: list[tuple[StorageLevel, int]] = []
        if "host" in urls:
            host = HostLevel(pool=self._pool)
        if "local" in urls:
            local = LocalLevel(
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
            chain.append((local, config.keep_last_local))
            if "remote" in urls:
                remote = RemoteLevel(
                    urls["remote"],
                    rank=self.rank,
                    world_size=self.world_size,
                    source=local,
                    pool=self._io_pool,
                    faults=self.faults,
                    storage_options=dict(config.remote_options),
                    commit_timeout_s=config.commit_timeout_s,
                )
                chain.append((remote, config.keep_last_remote))
        # Fastest first: the order restore tries them in.
        self._levels: tuple[StorageLevel, ...] = (
            *((host,) if host is not None else ()),
            *(lvl for lvl, _ in chain),
        )
        self._lock = threading.Lock()
        self._pending_copies: list[Snapshot] = []
        self._handles: dict[int, SaveHandle] = {}
        self.last_restore: RestoreReport | None = None
        self._pipeline = LevelPipeline(
            host=host,
            chain=chain,
            pool=self._pool,
            rank=self.rank,
            keep_every=config.keep_every,
            nice=config.background_nice,
        )
        self._stager = Stager(
            pool=self._pool,
            faults=self.faults,
            on_buffer=self._pipeline.on_buffer,
            on_copied=self._pipeline.on_copied,
            buffer_levels=frozenset(lvl.name for lvl in self._levels if lvl.holds_host_buffer),
            buffer_timeout_s=config.commit_timeout_s,
            nice=config.background_nice,
        )
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
        direct = self._direct_write(snap, refs)
        with self._lock:
            # Forget finished saves so the table stays small over a long run.
            for s, h in list(self._handles.items()):
                if all(h.done(lvl) for lvl in h.levels):
                    del self._handles[s]
            self._handles[step] = handle
            self._pending_copies.append(snap)
        if direct:
            self._pipeline.on_buffer(snap)  # the local writer starts from the live tensors
        else:
            self._stager.submit(snap)
        return handle

    def _direct_write(self, snap: Snapshot, refs: list[Any]) -> bool:
        """Attach a ``DirectWrite`` when the local level can write ``snap`` from the live tensors:
        ``staging="auto"``, CPU contiguous tensors, uncompressed, local level chosen, no host level
        (which needs its own copy in RAM)."""
        if not (
            self.config.staging == "auto"
            and self.config.compression == "none"
            and "local" in snap.levels
            and "host" not in snap.levels
            and can_write_direct(refs)
        ):
            return False
        snap.direct = DirectWrite(
            refs,
            snap.entries,
            total_bytes=snap.total_bytes,
            chunk_bytes=self.config.chunk_bytes,
            done=snap.copy_done,
        )
        snap.refs = None
        return True

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
            if snap.direct is not None and not snap.copy_done.is_set():
                try:
                    snap.direct.freeze(
                        lambda n: self._pool.acquire(
                            n, holders=1, pin=False, timeout_s=max(0.0, deadline - time.monotonic())
                        ),
                        timeout_s=max(0.0, deadline - time.monotonic()),
                    )
                except CheckpointTimeoutError:
                    raise
                except Exception as e:  # out of memory: that save fails, training goes on
                    logger.error(
                        "checkpoint step %d: staging at the freeze failed: %s", snap.step, e
                    )
                    snap.copy_done.set()
            if not snap.copy_done.wait(max(0.0, deadline - time.monotonic())):
                raise CheckpointTimeoutError(
                    f"the copy of step {snap.step} did not finish within {timeout_s} s"
                )
        with self._lock:
            self._pending_copies = [s for s in self._pending_copies if not s.copy_done.is_set()]
        self._surface_failures()

    def pop_failures(self) -> list[CheckpointWriteError]:
        """Level write failures since the last call (each names its step and level)."""
        return self._pipeline.pop_failures()

    def wait(self, timeout_s: float = 600.0) -> None:
        """Block until every save so far finished at every level (committed or failed).

        Implies ``wait_until_safe_to_mutate``: the tensors saved are free to change afterwards."""
        deadline = time.monotonic() + timeout_s
        self.wait_until_safe_to_mutate(timeout_s)
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            for lvl in h.levels:
                if not h.wait_finished(lvl, max(0.0, deadline - time.monotonic())):
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
            self._pipeline.close(timeout_s=timeout_s)
            self._io_pool.shutdown(wait=False)
            for lvl in self._levels:
                if isinstance(lvl, HostLevel):  # free the kept snapshot's buffer
                    for s in lvl.steps():
                        lvl.delete(s)

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

    def level(self, name: str) -> StorageLevel:
        """The configured level ``name`` (``"host"``, ``"local"`` or ``"remote"``)."""
        for lvl in self._levels:
            if lvl.name == name:
                return lvl
        raise ValueError(f"no level {name!r}: this Checkpointer has {self.levels}")

    def _level_steps(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for lvl in self._levels:
            try:
                out[lvl.name] = lvl.steps()
            except Exception as e:  # an unreachable remote: list what is reachable
                logger.warning("cannot list %s checkpoints at %s: %s", lvl.name, lvl.url, e)
                out[lvl.name] = []
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
                    result = (lvl, *self.level(lvl).load(s, into=into))
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

    def _surface_failures(self) -> None:
        fresh = self._pipeline.pop_unreported()
        for err in fresh:
            logger.error("checkpoint level %s failed for step %d: %s", err.level, err.step, err)
        if fresh and self.config.raise_on_failure:
            raise fresh[0]
