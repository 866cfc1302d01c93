"""``CheckpointConfig``: where (the level URLs) and how (retention, compression, threads) to checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowcomm.checkpoint import _format as fmt

__all__ = ["LEVELS", "CheckpointConfig"]

LEVELS = ("host", "local", "remote")  # fastest first: the order levels are written and restored


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
        staging: ``"auto"``: CPU tensors saved to the local level without the host level are
            written to disk straight from the live tensors while forward/backward run, and only
            the chunks not yet started at ``wait_until_safe_to_mutate`` are copied (one pass over
            the bytes instead of a copy and a write; measured in ``benchmarks/trainer.py``).
            ``"copy"``: always copy into host buffers first (the GPU path, the host level and
            compression always do).
        background_nice: niceness added to the background threads (copier, writers, I/O pool;
            Linux), so that on a CPU-bound host they run on the cycles training leaves idle instead
            of slowing every step they overlap: measured in ``benchmarks/trainer.py``, which runs
            both settings in one loop. 0 keeps them at the training thread's priority.
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
    background_nice: int = 10
    staging: str = "auto"

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
        if not 0 <= self.background_nice <= 19:
            raise ValueError(f"background_nice must be in [0, 19], got {self.background_nice}")
        if self.staging not in ("auto", "copy"):
            raise ValueError(f"staging must be 'auto' or 'copy', got {self.staging!r}")
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
