"""The storage levels below host memory: local disk (plain files) and remote (any fsspec URL).

Local disk uses plain files written in 16 MB chunks with parallel ``os.pwrite`` from a thread pool
(the GIL is released in pwrite, crc32c and zstd), each chunk's writeback started at once
(``sync_file_range``), not tensorstore: measured here on 600 MB, 4 threads of pwrite + fsync
reached 1.38 GB/s against 0.44-0.46 GB/s for tensorstore zarr3 (raw or zstd, 4 Mi-element chunks).
Both levels follow the same commit protocol: data, fsync, then the manifest written last (local:
tmp + fsync + rename + fsync dir; remote: the manifest object put last), and only a directory with
a valid manifest is a checkpoint.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from lowcomm._tensors import byte_view
from lowcomm.checkpoint import _format as fmt
from lowcomm.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointWriteError,
)
from lowcomm.checkpoint.staging import Snapshot, host_tensor
from lowcomm.faults import FaultInjector

logger = logging.getLogger(__name__)

__all__ = ["LocalLevel", "RemoteLevel", "decode_part"]

_POLL_S = 0.02
RECYCLE_DIR = ".recycle"  # data files of deleted checkpoints, rewritten by the next ones


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _preadv_all(fd: int, dest: memoryview, offset: int) -> int:
    done = 0
    while done < len(dest):
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n == 0:
            break  # end of file: the caller reports the short read
        done += n
    return done


def _usable_dest(t: torch.Tensor | None, entry: fmt.TensorEntry) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.device.type == "cpu"
        and t.is_contiguous()
        and str(t.dtype) == entry.dtype
        and list(t.shape) == entry.shape
    )


def decode_part(
    part: dict[str, Any],
    read: Callable[[int, int], bytes | memoryview],
    pool: ThreadPoolExecutor,
    *,
    read_into: Callable[[memoryview, int], int] | None = None,
    dests: dict[str, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], bytes]:
    """Read and verify one rank's data; returns its tensors (in entry order) and its skeleton.

    ``read(offset, length)`` returns stored bytes of the data file; ``read_into(view, offset)``
    (local files) reads straight into memory. With ``dests`` (key -> tensor, e.g. the model's own
    parameters), uncompressed data is read directly into those tensors when dtype and shape match,
    with no intermediate buffer and no extra copy; if verification then fails they hold partial
    data. Every chunk's crc32 is checked; any mismatch, short read or malformed chunk raises
    ``CheckpointCorruptError``.
    """
    total = int(part["total_bytes"])
    chunks = [fmt.ChunkEntry.from_json(c) for c in part["chunks"]]
    entries = [fmt.TensorEntry.from_json(e) for e in part["tensors"]]
    check = fmt.checksum_fn(part.get("checksum", "crc32"))
    if read_into is not None and all(c.codec == "none" for c in chunks):
        tensors = _read_direct(total, chunks, entries, read_into, pool, dests or {}, check)
    else:
        tensors = _read_buffered(total, chunks, entries, read, pool, check)
    skeleton = fmt.unb64(part["skeleton"])
    if fmt.crc32(skeleton) != int(part["skeleton_crc32"]):
        raise CheckpointCorruptError("skeleton checksum mismatch")
    return tensors, skeleton


def _run_all(
    pool: ThreadPoolExecutor, fn: Callable[[fmt.ChunkEntry], None], chunks: list[fmt.ChunkEntry]
) -> None:
    futures = [pool.submit(fn, c) for c in chunks]
    error: BaseException | None = None
    for f in futures:  # wait for every read before the file is closed
        try:
            f.result()
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error


def _read_direct(
    total: int,
    chunks: list[fmt.ChunkEntry],
    entries: list[fmt.TensorEntry],
    read_into: Callable[[memoryview, int], int],
    pool: ThreadPoolExecutor,
    dests: dict[str, torch.Tensor],
    check: Callable[..., int],
) -> list[torch.Tensor]:
    # The layout as segments (start, end, destination bytes): tensors, and padding to a scratch.
    segs: list[tuple[int, int, memoryview]] = []
    tensors: list[torch.Tensor] = []
    pos = 0
    for e in entries:
        if e.offset > pos:
            segs.append((pos, e.offset, memoryview(bytearray(e.offset - pos))))
        d = dests.get(e.key)
        t = d if d is not None and _usable_dest(d, e) else torch.empty(e.shape, dtype=_dtype(e))
        tensors.append(t)
        if e.nbytes:
            segs.append((e.offset, e.offset + e.nbytes, byte_view(t)))
        pos = max(pos, e.offset + e.nbytes)
    if total > pos:
        segs.append((pos, total, memoryview(bytearray(total - pos))))
    starts = [s[0] for s in segs]

    def one(c: fmt.ChunkEntry) -> None:
        lo_c, hi_c = c.raw_offset, c.raw_offset + c.raw_len
        crc = 0
        i = max(0, bisect.bisect_right(starts, lo_c) - 1)
        while i < len(segs) and segs[i][0] < hi_c:
            start, end, view = segs[i]
            lo, hi = max(start, lo_c), min(end, hi_c)
            if hi > lo:
                piece = view[lo - start : hi - start]
                got = read_into(piece, c.file_offset + (lo - lo_c))
                if got != len(piece):
                    raise CheckpointCorruptError(f"chunk at {c.file_offset} is truncated")
                crc = check(piece, crc)  # releases the GIL on large pieces
            i += 1
        if crc & 0xFFFFFFFF != c.crc32:
            raise CheckpointCorruptError(f"checksum mismatch in the chunk at byte {c.file_offset}")

    _run_all(pool, one, chunks)
    return tensors


def _read_buffered(
    total: int,
    chunks: list[fmt.ChunkEntry],
    entries: list[fmt.TensorEntry],
    read: Callable[[int, int], bytes | memoryview],
    pool: ThreadPoolExecutor,
    check: Callable[..., int],
) -> list[torch.Tensor]:
    buf = torch.empty(max(total, 1), dtype=torch.uint8)
    host = buf.numpy().data

    def one(c: fmt.ChunkEntry) -> None:
        stored = read(c.file_offset, c.stored_len)
        if len(stored) != c.stored_len:
            raise CheckpointCorruptError(
                f"chunk at {c.file_offset} is truncated ({len(stored)} of {c.stored_len} bytes)"
            )
        if check(stored) != c.crc32:
            raise CheckpointCorruptError(f"checksum mismatch in the chunk at byte {c.file_offset}")
        raw = fmt.decode_chunk(stored, c.codec, c.raw_len)
        host[c.raw_offset : c.raw_offset + c.raw_len] = raw

    _run_all(pool, one, chunks)
    return [host_tensor(buf, e) for e in entries]


def _dtype(entry: fmt.TensorEntry) -> torch.dtype:
    dtype = getattr(torch, entry.dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointCorruptError(f"unknown dtype {entry.dtype!r} in checkpoint")
    return dtype


class LocalLevel:
    """Checkpoints under a local directory. Writes run on the caller's thread plus ``pool``.

    With several ranks, the directory must be shared by them (one host, or a shared file system):
    each rank writes its data file and part manifest, and rank 0 writes ``MANIFEST.json`` once every
    part is durable.
    """

    name = "local"

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

    def write(self, snap: Snapshot) -> bytes:
        """Stream ``snap`` to disk as its copy progresses and commit it; returns the manifest bytes.

        Blocks until committed. Raises ``CheckpointWriteError`` (the OSError inside says why);
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
            if not self._stream_during_copy:
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
                return self._wait_manifest(snap.step)
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
            return blob
        except (OSError, CheckpointError) as e:
            self._remove_partial(snap.step)
            raise CheckpointWriteError(
                f"checkpoint step {snap.step} could not be written to {self.root}: {e}",
                step=snap.step,
                level=self.name,
            ) from e

    def _write_chunks(self, fd: int, snap: Snapshot) -> tuple[list[fmt.ChunkEntry], int]:
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
            self._faults.hit("local.write")
            _pwrite_all(fd, memoryview(stored), file_offset)
            fmt.start_writeback(fd, file_offset, len(stored))
            return fmt.ChunkEntry(raw_offset, raw_len, file_offset, len(stored), codec, crc)

        futures = [
            self._pool.submit(one, off) for off in range(0, snap.total_bytes, self._chunk_bytes)
        ]
        chunks = []
        error: BaseException | None = None
        for f in futures:  # wait for all, even after a failure, so no write touches a closed fd
            try:
                chunks.append(f.result())
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error
        data_bytes = snap.total_bytes if self._compression == "none" else next_file_offset[0]
        return chunks, data_bytes

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

    def load(
        self, step: int, *, dests: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, Any], tuple[list[torch.Tensor], bytes]]:
        """Read, verify and decode this rank's part of ``step`` (into ``dests`` where they fit).

        Raises ``CheckpointCorruptError`` if anything fails verification."""
        with open(self.manifest_path(step), "rb") as f:
            body = fmt.load_manifest_bytes(f.read())
        part = _my_part(body, step=step, rank=self.rank, world_size=self.world_size)
        path = os.path.join(self.step_dir(step), part["data_file"])
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != int(part["data_bytes"]):
                raise CheckpointCorruptError(
                    f"{path} has {os.fstat(fd).st_size} bytes, manifest says {part['data_bytes']}"
                )
            return body, decode_part(
                part,
                lambda off, n: os.pread(fd, n, off),
                self._pool,
                read_into=lambda dest, off: _preadv_all(fd, dest, off),
                dests=dests,
            )
        finally:
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

    def uncommitted_steps(self) -> list[int]:
        """Step directories without a manifest: in flight, or left by a crashed writer."""
        out = []
        for name in os.listdir(self.root):
            step = fmt.parse_step_dirname(name)
            if step is not None and not os.path.exists(self.manifest_path(step)):
                out.append(step)
        return out


def _my_part(body: dict[str, Any], *, step: int, rank: int, world_size: int) -> dict[str, Any]:
    if int(body["step"]) != step:
        raise CheckpointCorruptError(f"manifest says step {body['step']}, directory says {step}")
    if int(body["world_size"]) != world_size:
        raise CheckpointCorruptError(
            f"step {step} was saved by {body['world_size']} ranks; this job has {world_size} "
            "(restoring on another world size is not supported)"
        )
    part: dict[str, Any] = body["ranks"][rank]
    if int(part["rank"]) != rank:
        raise CheckpointCorruptError(
            f"manifest lists rank {part['rank']} where rank {rank} should be"
        )
    return part


class RemoteLevel:
    """Checkpoints under an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://`` ...).

    Uploads copy the committed local files; the manifest object is put last (by rank 0, after every
    rank's marker object is present), so a listing never shows a half-uploaded checkpoint.
    """

    name = "remote"

    def __init__(
        self,
        url: str,
        *,
        rank: int,
        world_size: int,
        pool: ThreadPoolExecutor,
        faults: FaultInjector,
        storage_options: dict[str, Any],
        commit_timeout_s: float,
    ) -> None:
        import fsspec

        self.url = url
        self.rank = rank
        self.world_size = world_size
        self._pool = pool
        self._faults = faults
        self._commit_timeout_s = commit_timeout_s
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")

    def _path(self, step: int, name: str = "") -> str:
        base = f"{self.root}/{fmt.step_dirname(step)}"
        return f"{base}/{name}" if name else base

    def upload(self, step: int, local: LocalLevel, manifest_blob: bytes) -> None:
        """Upload this rank's committed local files of ``step``; rank 0 puts the manifest last."""
        try:
            self._faults.hit("remote.put")
            self.fs.makedirs(self._path(step), exist_ok=True)
            self.fs.put_file(
                local.data_path(step, self.rank), self._path(step, fmt.data_name(self.rank))
            )
            if self.world_size > 1:
                self.fs.pipe_file(self._path(step, fmt.part_name(self.rank)), b"uploaded")
            deadline = time.monotonic() + self._commit_timeout_s
            if self.rank != 0:  # committed once rank 0 has put the manifest
                manifest = self._path(step, fmt.MANIFEST_NAME)
                while not self.fs.exists(manifest):
                    if time.monotonic() > deadline:
                        raise CheckpointTimeoutError(f"rank 0 did not commit step {step} in time")
                    time.sleep(0.1)
                    self.fs.invalidate_cache()
                return
            for r in range(1, self.world_size):
                while not self.fs.exists(self._path(step, fmt.part_name(r))):
                    if time.monotonic() > deadline:
                        raise CheckpointTimeoutError(f"rank {r} did not upload step {step} in time")
                    time.sleep(0.1)
                    self.fs.invalidate_cache()
            self._faults.hit("remote.put")
            self.fs.pipe_file(self._path(step, fmt.MANIFEST_NAME), manifest_blob)
        except Exception as e:
            raise CheckpointWriteError(
                f"checkpoint step {step} could not be uploaded to {self.url}: {type(e).__name__}: {e}",
                step=step,
                level=self.name,
            ) from e

    def steps(self) -> list[int]:
        self.fs.invalidate_cache()
        try:
            listing = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for path in listing:
            step = fmt.parse_step_dirname(str(path))
            if step is not None and self.fs.exists(self._path(step, fmt.MANIFEST_NAME)):
                out.append(step)
        return sorted(out)

    def load(
        self, step: int, *, dests: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, Any], tuple[list[torch.Tensor], bytes]]:
        """Download, verify and decode this rank's part of ``step`` (``dests`` is not used: remote
        data goes through a host buffer)."""
        body = fmt.load_manifest_bytes(self.fs.cat_file(self._path(step, fmt.MANIFEST_NAME)))
        part = _my_part(body, step=step, rank=self.rank, world_size=self.world_size)
        path = self._path(step, part["data_file"])
        size = self.fs.size(path)
        if size != int(part["data_bytes"]):
            raise CheckpointCorruptError(
                f"{path} has {size} bytes, manifest says {part['data_bytes']}"
            )

        def read(off: int, n: int) -> bytes:
            data: bytes = self.fs.cat_file(path, start=off, end=off + n)
            return data

        return body, decode_part(part, read, self._pool)

    def delete(self, step: int) -> None:
        manifest = self._path(step, fmt.MANIFEST_NAME)
        if self.fs.exists(manifest):
            self.fs.rm(manifest)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(step), recursive=True)
