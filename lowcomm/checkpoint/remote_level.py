"""``RemoteLevel``: checkpoints under any fsspec URL, uploaded from the local level's committed files.

Same commit protocol as local disk: the data objects first, the manifest object put last (by rank
0, once every rank's marker object is present), so a listing never shows a half-uploaded checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lowcomm.checkpoint import _format as fmt
from lowcomm.checkpoint._reads import decode_part, rank_part
from lowcomm.checkpoint._reshard import load_resharded, needs_reshard
from lowcomm.checkpoint._state import restore_state
from lowcomm.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointWriteError,
)
from lowcomm.checkpoint.local_level import LocalLevel
from lowcomm.checkpoint.staging import Snapshot
from lowcomm.faults import FaultInjector

__all__ = ["RemoteLevel"]


class RemoteLevel:
    """Checkpoints under an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://`` ...).

    Uploads copy the committed local files; the manifest object is put last (by rank 0, after every
    rank's marker object is present), so a listing never shows a half-uploaded checkpoint.
    """

    name = "remote"
    holds_host_buffer = False  # it uploads the local level's committed files

    def __init__(
        self,
        url: str,
        *,
        rank: int,
        world_size: int,
        source: LocalLevel,
        pool: ThreadPoolExecutor,
        faults: FaultInjector,
        storage_options: dict[str, Any],
        commit_timeout_s: float,
    ) -> None:
        # Imported here, not at the top: fsspec takes ~0.3 s to import (measured here) and most
        # runs configure no remote level. Not an import cycle.
        import fsspec

        self.url = url
        self.rank = rank
        self.world_size = world_size
        self._source = source
        self._pool = pool
        self._faults = faults
        self._commit_timeout_s = commit_timeout_s
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")

    def _path(self, step: int, name: str = "") -> str:
        base = f"{self.root}/{fmt.step_dirname(step)}"
        return f"{base}/{name}" if name else base

    def write(self, snap: Snapshot) -> None:
        """Upload this rank's committed local files of ``snap``; rank 0 puts the manifest last.

        Needs ``snap.manifest`` (set once the local level committed ``snap``). Blocks until
        committed; raises ``CheckpointWriteError``."""
        step = snap.step
        try:
            if snap.manifest is None:
                raise CheckpointError(f"step {step} is not committed at the local level")
            self._faults.hit("remote.put")
            self.fs.makedirs(self._path(step), exist_ok=True)
            self.fs.put_file(
                self._source.data_path(step, self.rank), self._path(step, fmt.data_name(self.rank))
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
            self.fs.pipe_file(self._path(step, fmt.MANIFEST_NAME), snap.manifest)
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

    def load(self, step: int, *, into: Any = None) -> tuple[Any, dict[str, Any]]:
        """Download, verify and decode this rank's part of ``step``; returns (state, metadata).

        Remote data goes through a host buffer, then into ``into`` when it is given."""
        body = fmt.load_manifest_bytes(self.fs.cat_file(self._path(step, fmt.MANIFEST_NAME)))
        if needs_reshard(body, rank=self.rank, world_size=self.world_size, into=into):

            def readers(r: int) -> Callable[[int, int], bytes]:
                path = self._path(step, body["ranks"][r]["data_file"])

                def read(off: int, n: int) -> bytes:
                    data: bytes = self.fs.cat_file(path, start=off, end=off + n)
                    return data

                return read

            state = load_resharded(
                body, rank=self.rank, into=into, readers=readers, pool=self._pool
            )
            return state, dict(body.get("metadata", {}))
        part = rank_part(body, step=step, rank=self.rank, world_size=self.world_size)
        path = self._path(step, part["data_file"])
        size = self.fs.size(path)
        if size != int(part["data_bytes"]):
            raise CheckpointCorruptError(
                f"{path} has {size} bytes, manifest says {part['data_bytes']}"
            )

        def read(off: int, n: int) -> bytes:
            data: bytes = self.fs.cat_file(path, start=off, end=off + n)
            return data

        tensors, skeleton = decode_part(part, read, self._pool)
        return restore_state(skeleton, tensors, into), dict(body.get("metadata", {}))

    def partial_steps(self) -> list[int]:
        return []  # partial uploads are not listed (nor removed): only local disk is scanned

    def delete(self, step: int) -> None:
        manifest = self._path(step, fmt.MANIFEST_NAME)
        if self.fs.exists(manifest):
            self.fs.rm(manifest)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(step), recursive=True)
