"""Reading one rank's data file back: chunk by chunk in parallel, verified, straight into tensors.

Uncompressed files are read directly into the destination tensors (``preadv``, no intermediate
buffer); compressed or remote data goes through one host buffer. Every chunk's checksum is checked.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from lowcomm._tensors import byte_view
from lowcomm.checkpoint import _format as fmt
from lowcomm.checkpoint.errors import CheckpointCorruptError
from lowcomm.checkpoint.staging import host_tensor

__all__ = ["decode_part", "rank_part"]


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


def rank_part(body: dict[str, Any], *, step: int, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's part of a verified manifest body; ``CheckpointCorruptError`` if it does not fit."""
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
