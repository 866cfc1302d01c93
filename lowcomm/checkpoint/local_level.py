"""``LocalLevel``: checkpoints as plain files under a local (or shared) directory.

Data is written in 16 MB chunks with parallel ``os.pwrite`` from a thread pool (the GIL is released
in pwrite, crc32c and zstd), each chunk's writeback started at once (``sync_file_range``), not
tensorstore: measured here on 600 MB, 4 threads of pwrite + fsync reached 1.38 GB/s against
0.44-0.46 GB/s for tensorstore zarr3 (raw or zstd, 4 Mi-element chunks). Commit: data, fsync, then
the manifest written last (tmp + fsync + rename + fsync dir); only a directory with a valid
manifest is a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lowcomm.checkpoint import _format as fmt
from lowcomm.checkpoint._direct import DirectWrite
from lowcomm.checkpoint._reads import decode_part, rank_part
from lowcomm.checkpoint._reshard import load_resharded, needs_reshard
from lowcomm.checkpoint._state import restore_state, template_tensors
from lowcomm.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointWriteError,
)
from lowcomm.checkpoint.staging import Snapshot
from lowcomm.faults import FaultInjector, damaged

__all__ = ["RECYCLE_DIR", "LocalLevel"]

_POLL_S = 0.02
RECYCLE_DIR = ".recycle"  # data files of deleted checkpoints, rewritten by the next ones


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pwritev_all(fd: int, pieces: list[memoryview], offset: int) -> None:
    views = [p.cast("B") for p in pieces if len(p)]
    while views:
        n = os.pwritev(fd, views[:1024], offset)  # IOV_MAX
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _preadv_all(fd: int, dest: memoryview, offset: int) -> int:
    done = 0
    while done < len(dest):
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n == 0:
            break  # end of file: the caller reports the short read
        done += n
    return done


class LocalLevel:
    """Checkpoints under a local directory. Writes run on the caller's thread plus ``pool``.

    With several ranks, the directory must be shared by them (one host, or a shared file system):
    each rank writes its data file and part manifest, and rank 0 writes ``MANIFEST.json`` once every
    part is durable.
    """

    name = "local"
    holds_host_buffer = True

    def __init__(
        self,
        root: str,
        *,
        rank: int,
        world_size: int,
        pool: ThreadPoolExecutor,
        faults: FaultInjector,
        chunk_bytes: int,
        compression: str,
        zstd_level: int,
        commit_timeout_s: float,
        stream_during_copy: bool = False,
    ) -> None:
        self.root = root
        self.url = root
        self._stream_during_copy = stream_during_copy
        self.rank = rank
        self.world_size = world_size
        self._pool = pool
        self._faults = faults
        self._chunk_bytes = chunk_bytes
        self._compression = compression
        self._zstd_level = zstd_level
        self._commit_timeout_s = commit_timeout_s
        os.makedirs(root, exist_ok=True)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, fmt.step_dirname(step))

    def manifest_path(self, step: int) -> str:
        return os.path.join(self.step_dir(step), fmt.MANIFEST_NAME)

    def data_path(self, step: int, rank: int) -> str:
        return os.path.join(self.step_dir(step), fmt.data_name(rank))

    # ---- write ---------------------------------------------------------------------------------

    def write(self, snap: Snapshot) -> None:
        """Stream ``snap`` to disk as its copy progresses and commit it; blocks until committed.

        Sets ``snap.manifest`` to the committed manifest bytes (the remote level puts the same). Raises ``CheckpointWriteError`` (the OSError inside says why);
        then this rank's partial files are removed and nothing committed is touched.
        """
        step_dir = self.step_dir(snap.step)
        if os.path.exists(self.manifest_path(snap.step)):
            raise CheckpointWriteError(
                f"step {snap.step} is already committed at {step_dir}; not overwriting it",
                step=snap.step,
                level=self.name,
            )
        data_path = self.data_path(snap.step, self.rank)
        try:
            if not self._stream_during_copy and snap.direct is None:
                # Let the copy finish alone: it is what the training thread may be waiting for.
                snap.wait_copied(snap.total_bytes, timeout_s=self._commit_timeout_s)
            os.makedirs(step_dir, exist_ok=True)
            self._faults.hit("local.open")
            if not os.path.exists(data_path):
                self._take_recycled(data_path)
            # No O_TRUNC: every byte up to data_bytes is rewritten, then the file is cut there.
            fd = os.open(data_path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                chunks, data_bytes = self._write_chunks(fd, snap)
                os.ftruncate(fd, data_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            part = {
                "rank": self.rank,
                "data_file": fmt.data_name(self.rank),
                "data_bytes": data_bytes,
                "total_bytes": snap.total_bytes,
                "skeleton": fmt.b64(snap.skeleton),
                "skeleton_crc32": fmt.crc32(snap.skeleton),
                "checksum": fmt.CHUNK_CHECKSUM,
                "tensors": [e.to_json() for e in snap.entries],
                "chunks": [c.to_json() for c in chunks],
            }
            if self.world_size > 1:
                fmt.atomic_write(
                    os.path.join(step_dir, fmt.part_name(self.rank)), json.dumps(part).encode()
                )
            if self.rank != 0:
                snap.manifest = self._wait_manifest(snap.step)
                return
            parts = [part] if self.world_size == 1 else self._gather_parts(snap.step)
            body = {
                "format_version": fmt.FORMAT_VERSION,
                "step": snap.step,
                "world_size": self.world_size,
                "created_unix": time.time(),
                "metadata": snap.metadata,
                "ranks": parts,
            }
            blob = fmt.manifest_bytes(body)
            self._faults.hit("local.manifest")
            fmt.atomic_write(self.manifest_path(snap.step), blob)
            snap.manifest = blob
        except (OSError, CheckpointError) as e:
            self._remove_partial(snap.step)
            raise CheckpointWriteError(
                f"checkpoint step {snap.step} could not be written to {self.root}: {e}",
                step=snap.step,
                level=self.name,
            ) from e

    def _write_chunks(self, fd: int, snap: Snapshot) -> tuple[list[fmt.ChunkEntry], int]:
        if snap.direct is not None:
            return self._write_direct(fd, snap.direct), snap.total_bytes
        host = snap.host_view()
        lock = threading.Lock()
        next_file_offset = [0]
        timeout_s = self._commit_timeout_s
        check = fmt.checksum_fn(fmt.CHUNK_CHECKSUM)

        def one(raw_offset: int) -> fmt.ChunkEntry:
            raw_len = min(self._chunk_bytes, snap.total_bytes - raw_offset)
            snap.wait_copied(raw_offset + raw_len, timeout_s=timeout_s)
            raw = host[raw_offset : raw_offset + raw_len]
            stored, codec = fmt.encode_chunk(raw, self._compression, level=self._zstd_level)
            if codec == "none" and self._compression == "none":
                file_offset = raw_offset  # uncompressed: the file is the host layout
            else:
                with lock:
                    file_offset = next_file_offset[0]
                    next_file_offset[0] += len(stored)
            crc = check(stored)
            if self._faults.hit("local.write"):
                stored = memoryview(
                    damaged(stored)
                )  # bit rot after the checksum: restore catches it
            _pwrite_all(fd, memoryview(stored), file_offset)
            fmt.start_writeback(fd, file_offset, len(stored))
            return fmt.ChunkEntry(raw_offset, raw_len, file_offset, len(stored), codec, crc)

        futures = [
            self._pool.submit(one, off) for off in range(0, snap.total_bytes, self._chunk_bytes)
        ]
        chunks = _results(futures)
        data_bytes = snap.total_bytes if self._compression == "none" else next_file_offset[0]
        return chunks, data_bytes

    def _write_direct(self, fd: int, direct: DirectWrite) -> list[fmt.ChunkEntry]:
        """Uncompressed chunks written from the live tensors (or their staged copy): the file is
        the host layout, each chunk one ``pwritev`` of its pieces."""
        check = fmt.checksum_fn(fmt.CHUNK_CHECKSUM)

        def one(index: int) -> fmt.ChunkEntry:
            offset = index * self._chunk_bytes
            try:
                pieces = direct.begin(index, timeout_s=self._commit_timeout_s)
                crc = 0
                for p in pieces:
                    crc = check(p, crc)
                if self._faults.hit("local.write"):  # bit rot after the checksum
                    pieces = [memoryview(damaged(b"".join(pieces)))]
                _pwritev_all(fd, pieces, offset)
            finally:
                direct.end(index)
            length = sum(len(p) for p in pieces)
            fmt.start_writeback(fd, offset, length)
            return fmt.ChunkEntry(offset, length, offset, length, "none", crc)

        futures = [self._pool.submit(one, i) for i in range(direct.num_chunks())]
        chunks = _results(futures)
        return chunks

    def _gather_parts(self, step: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self._commit_timeout_s
        parts: list[dict[str, Any]] = []
        for r in range(self.world_size):
            path = os.path.join(self.step_dir(step), fmt.part_name(r))
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise CheckpointTimeoutError(
                        f"rank {r} did not write its part of step {step} within "
                        f"{self._commit_timeout_s:.0f} s"
                    )
                time.sleep(_POLL_S)
            with open(path, "rb") as f:
                parts.append(json.loads(f.read()))
        return parts

    def _wait_manifest(self, step: int) -> bytes:
        deadline = time.monotonic() + self._commit_timeout_s
        path = self.manifest_path(step)
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise CheckpointTimeoutError(f"rank 0 did not commit step {step} in time")
            time.sleep(_POLL_S)
        with open(path, "rb") as f:
            return f.read()

    def _remove_partial(self, step: int) -> None:
        # Best effort: free the space of a failed write (disk full), never a committed checkpoint.
        if os.path.exists(self.manifest_path(step)):
            return
        for name in (fmt.data_name(self.rank), fmt.part_name(self.rank)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.step_dir(step), name))

    # ---- read ----------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps (those with a manifest file), oldest first. Cheap: no verification."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            step = fmt.parse_step_dirname(name)
            if step is not None and os.path.exists(self.manifest_path(step)):
                out.append(step)
        return sorted(out)

    def load(self, step: int, *, into: Any = None) -> tuple[Any, dict[str, Any]]:
        """Read, verify and decode this rank's part of ``step`` (uncompressed data straight into
        ``into``'s tensors where dtype and shape match); returns (state, metadata).

        Raises ``CheckpointCorruptError`` if anything fails verification."""
        with open(self.manifest_path(step), "rb") as f:
            body = fmt.load_manifest_bytes(f.read())
        if needs_reshard(body, rank=self.rank, world_size=self.world_size, into=into):
            return self._load_resharded(step, body, into), dict(body.get("metadata", {}))
        part = rank_part(body, step=step, rank=self.rank, world_size=self.world_size)
        path = os.path.join(self.step_dir(step), part["data_file"])
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != int(part["data_bytes"]):
                raise CheckpointCorruptError(
                    f"{path} has {os.fstat(fd).st_size} bytes, manifest says {part['data_bytes']}"
                )
            tensors, skeleton = decode_part(
                part,
                lambda off, n: os.pread(fd, n, off),
                self._pool,
                read_into=lambda dest, off: _preadv_all(fd, dest, off),
                dests=template_tensors(into),
            )
        finally:
            os.close(fd)
        return restore_state(skeleton, tensors, into), dict(body.get("metadata", {}))

    def _load_resharded(self, step: int, body: dict[str, Any], into: Any) -> Any:
        fds: dict[int, int] = {}

        def readers(r: int) -> Callable[[int, int], bytes]:
            part = body["ranks"][r]
            path = os.path.join(self.step_dir(step), part["data_file"])
            fds[r] = fd = os.open(path, os.O_RDONLY)
            if os.fstat(fd).st_size != int(part["data_bytes"]):
                raise CheckpointCorruptError(
                    f"{path} has {os.fstat(fd).st_size} bytes, manifest says {part['data_bytes']}"
                )
            return lambda off, n: os.pread(fd, n, off)

        try:
            return load_resharded(
                body,
                rank=self.rank,
                into=into,
                readers=readers,
                pool=self._pool,
                readers_into=lambda r: lambda dest, off: _preadv_all(fds[r], dest, off),
            )
        finally:
            for fd in fds.values():
                os.close(fd)

    # ---- retention -----------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Delete a checkpoint: the manifest first (so it stops existing at once), then its data.

        Up to ``world_size`` data files are kept in ``.recycle/`` and overwritten by the next
        checkpoints: rewriting blocks and cached pages that a file already owns cost 0.18 s of CPU
        per 600 MB here, against 1-1.8 s for a fresh file (block and page allocation).
        """
        step_dir = self.step_dir(step)
        manifest = self.manifest_path(step)
        if os.path.exists(manifest):
            os.remove(manifest)
            fmt.fsync_dir(step_dir)
        recycle = os.path.join(self.root, RECYCLE_DIR)
        with contextlib.suppress(OSError):
            os.makedirs(recycle, exist_ok=True)
            kept = len(os.listdir(recycle))
            for name in sorted(os.listdir(step_dir)):
                if kept >= self.world_size or not name.endswith(".data"):
                    continue
                os.replace(os.path.join(step_dir, name), os.path.join(recycle, f"{step}-{name}"))
                kept += 1
        shutil.rmtree(step_dir, ignore_errors=True)

    def _take_recycled(self, dest: str) -> bool:
        recycle = os.path.join(self.root, RECYCLE_DIR)
        try:
            names = sorted(os.listdir(recycle))
        except FileNotFoundError:
            return False
        for name in names:
            try:
                os.rename(os.path.join(recycle, name), dest)
                return True
            except FileNotFoundError:  # another rank took it first
                continue
        return False

    def partial_steps(self) -> list[int]:
        """Step directories without a manifest: in flight, or left by a crashed writer."""
        out = []
        for name in os.listdir(self.root):
            step = fmt.parse_step_dirname(name)
            if step is not None and not os.path.exists(self.manifest_path(step)):
                out.append(step)
        return out


def _results(futures: list[Future[fmt.ChunkEntry]]) -> list[fmt.ChunkEntry]:
    """Every chunk write's entry, in order; waits for all, even after a failure, so no write
    touches a closed fd, then raises the first failure."""
    chunks = []
    error: BaseException | None = None
    for f in futures:
        try:
            chunks.append(f.result())
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error
    return chunks
