"""``CheckpointReader``: a level's checkpoints read from outside a training job (any rank count).

What ``lowcomm checkpoint list|verify|export`` uses: list the committed steps of a level (a local
directory or any fsspec URL), verify every chunk's checksum of every rank, and load a step as
whole (unsharded) tensors, assembled from the ranks' shards by their recorded offsets.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lowcomm.checkpoint import _format as fmt
from lowcomm.checkpoint._reshard import Chunks, load_resharded
from lowcomm.checkpoint._state import unflatten_state
from lowcomm.checkpoint.errors import CheckpointCorruptError, NoCheckpointError

__all__ = ["CheckpointReader", "StepSummary"]


@dataclass(frozen=True)
class StepSummary:
    """One committed step of a level: its size, its ranks and the manifest's metadata."""

    step: int
    world_size: int
    total_bytes: int
    stored_bytes: int
    num_tensors: int
    metadata: dict[str, Any]


class CheckpointReader:
    """Reads one level's checkpoints (``url``: a directory, ``file://``, ``s3://`` ...).

    Not thread-safe; nothing is written. ``storage_options`` go to fsspec.
    """

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec  # ~0.3 s to import: only here

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        if not self.fs.isdir(self.root):
            raise NoCheckpointError(f"{url} is not a directory: no checkpoints there")
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="lowcomm-ckpt-read")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def steps(self) -> list[int]:
        """Committed steps (those with a manifest), oldest first."""
        out = []
        for entry in self.fs.ls(self.root, detail=False):
            step = fmt.parse_step_dirname(str(entry))
            if step is not None and self.fs.exists(
                self._path(fmt.step_dirname(step), fmt.MANIFEST_NAME)
            ):
                out.append(step)
        return sorted(out)

    def manifest(self, step: int) -> dict[str, Any]:
        """The verified manifest body of ``step``; ``NoCheckpointError`` if it is not committed."""
        path = self._path(fmt.step_dirname(step), fmt.MANIFEST_NAME)
        if not self.fs.exists(path):
            have = ", ".join(map(str, self.steps())) or "none"
            raise NoCheckpointError(f"no committed step {step} at {self.url} (steps: {have})")
        return fmt.load_manifest_bytes(self.fs.cat_file(path))

    def summary(self, step: int) -> StepSummary:
        body = self.manifest(step)
        ranks = body["ranks"]
        return StepSummary(
            step=step,
            world_size=int(body["world_size"]),
            total_bytes=sum(int(p["total_bytes"]) for p in ranks),
            stored_bytes=sum(int(p["data_bytes"]) for p in ranks),
            num_tensors=len(ranks[0]["tensors"]) if ranks else 0,
            metadata=dict(body.get("metadata", {})),
        )

    def _reader(self, step: int, body: dict[str, Any], rank: int) -> Any:
        path = self._path(fmt.step_dirname(step), body["ranks"][rank]["data_file"])
        size = self.fs.size(path)
        if size != int(body["ranks"][rank]["data_bytes"]):
            raise CheckpointCorruptError(
                f"{path} has {size} bytes, the manifest says {body['ranks'][rank]['data_bytes']}"
            )

        def read(off: int, n: int) -> bytes:
            data: bytes = self.fs.cat_file(path, start=off, end=off + n)
            return data

        return read

    def verify(self, step: int) -> int:
        """Reads every chunk of every rank of ``step`` and checks its checksum; returns the bytes
        checked. Raises ``CheckpointCorruptError`` naming the first bad rank and chunk."""
        body = self.manifest(step)
        checked = 0
        for rank, part in enumerate(body["ranks"]):
            skeleton = fmt.unb64(part["skeleton"])
            if fmt.crc32(skeleton) != int(part["skeleton_crc32"]):
                raise CheckpointCorruptError(f"step {step} rank {rank}: skeleton checksum mismatch")
            chunks = Chunks(part, self._reader(step, body, rank))

            def one(i: int, chunks: Chunks = chunks) -> int:
                chunks.load(i)
                return chunks.chunks[i].stored_len

            try:
                for n in self._pool.map(one, range(len(chunks.chunks))):
                    checked += n
            except CheckpointCorruptError as e:
                raise CheckpointCorruptError(f"step {step} rank {rank}: {e}") from e
            chunks.cache.clear()
        return checked

    def load_full(self, step: int) -> Any:
        """The state of ``step`` with every sharded tensor whole (CPU tensors), verified."""
        body = self.manifest(step)
        part = body["ranks"][0]
        template = []
        for e in (fmt.TensorEntry.from_json(x) for x in part["tensors"]):
            dtype = getattr(torch, e.dtype.removeprefix("torch."))
            shape = e.shape if e.dtensor is None else [int(n) for n in e.dtensor["global_shape"]]
            template.append(torch.empty(shape, dtype=dtype))
        into = unflatten_state(fmt.unb64(part["skeleton"]), template)
        return load_resharded(
            body, rank=0, into=into, readers=lambda r: self._reader(step, body, r), pool=self._pool
        )
