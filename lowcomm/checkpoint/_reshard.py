"""Restoring a checkpoint of N ranks on M ranks: each rank assembles its new shards from the byte
ranges of the saved shards that overlap them, never the full tensor.

Every saved DTensor shard records its global offsets and local shape (``_state.flatten_state``).
A destination is the restore template's tensor: a DTensor's local shard (its offsets from the live
DTensor) or a plain tensor holding the whole global tensor. Shards split along dimension 0 (FSDP2's
``Shard(0)``, and any 1-D layout) map to contiguous byte ranges; a saved row range is read from the
chunks that cover it, each chunk verified against its checksum before any of its bytes are used.
Tensors saved without DTensor metadata (AdamW's step counters, plain values) come from the saved
rank with this rank's index, or from rank 0 when there are fewer saved ranks.

Why not tensorstore: the format already stores each shard's byte ranges with checksums, so a
resharded read is a handful of ``pread`` calls per tensor; tensorstore would need a second on-disk
format (zarr, measured 3x slower to write here, see ``local_level``) for the same row arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lowcomm._tensors import byte_view
from lowcomm.checkpoint import _format as fmt
from lowcomm.checkpoint._state import flatten_state, restore_state
from lowcomm.checkpoint.errors import CheckpointCorruptError

__all__ = ["Chunks", "load_resharded", "needs_reshard"]

Reader = Callable[[int, int], bytes | memoryview]  # (file offset, length) of one rank's data
ReadInto = Callable[[memoryview, int], int]  # (destination, file offset) -> bytes read


@dataclass(frozen=True)
class _Piece:
    rank: int
    entry: fmt.TensorEntry
    offsets: list[int]
    local_shape: list[int]


def _region(meta: dict[str, Any] | None, shape: list[int]) -> tuple[list[int], list[int]]:
    if meta is None:
        return [0] * len(shape), shape
    if "offsets" not in meta:
        raise CheckpointCorruptError(
            "the checkpoint's shards do not record their offsets (saved by an older lowcomm): "
            "restore it on the world size that saved it"
        )
    return [int(o) for o in meta["offsets"]], [int(n) for n in meta["local_shape"]]


class Chunks:
    """One saved rank's chunks, read on demand (verified, decoded) and kept for this restore."""

    def __init__(self, part: dict[str, Any], read: Reader) -> None:
        self.chunks = sorted(
            (fmt.ChunkEntry.from_json(c) for c in part["chunks"]), key=lambda c: c.raw_offset
        )
        self.read = read
        self.check = fmt.checksum_fn(part.get("checksum", "crc32"))
        self.cache: dict[int, bytes | memoryview] = {}

    def covering(self, lo: int, hi: int) -> list[int]:
        return [
            i
            for i, c in enumerate(self.chunks)
            if c.raw_offset < hi and c.raw_offset + c.raw_len > lo
        ]

    def load(self, i: int) -> None:
        c = self.chunks[i]
        stored = self.read(c.file_offset, c.stored_len)
        if len(stored) != c.stored_len:
            raise CheckpointCorruptError(f"chunk at {c.file_offset} is truncated")
        if self.check(stored) != c.crc32:
            raise CheckpointCorruptError(f"checksum mismatch in the chunk at byte {c.file_offset}")
        self.cache[i] = fmt.decode_chunk(stored, c.codec, c.raw_len)

    def read_direct(
        self, i: int, segs: list[tuple[int, int, memoryview]], read_into: ReadInto
    ) -> None:
        """Reads uncompressed chunk ``i`` straight into the destinations ``segs`` ((lo, hi, dest):
        raw bytes [lo, hi) of the layout go to ``dest``), the rest of the chunk into a scratch,
        and verifies its checksum over all of it, in order. On a mismatch the destinations hold
        unverified bytes and ``CheckpointCorruptError`` is raised (the restore fails as a whole)."""
        c = self.chunks[i]
        lo_c, hi_c = c.raw_offset, c.raw_offset + c.raw_len
        pieces: list[tuple[int, memoryview]] = []
        for lo, hi, dest in segs:
            a, b = max(lo, lo_c), min(hi, hi_c)
            if b > a:
                pieces.append((a, dest[a - lo : b - lo]))
        pieces.sort(key=lambda p: p[0])
        pos = lo_c
        views: list[tuple[int, memoryview]] = []
        for a, view in pieces:
            if a < pos:  # two destinations of one byte range: read it whole instead
                self.load(i)
                for lo, hi, dest in segs:
                    self.copy_chunk(i, lo, hi, dest)
                return
            if a > pos:
                views.append((pos, memoryview(bytearray(a - pos))))
            views.append((a, view))
            pos = a + len(view)
        if pos < hi_c:
            views.append((pos, memoryview(bytearray(hi_c - pos))))
        crc = 0
        for a, view in views:
            if read_into(view, c.file_offset + (a - lo_c)) != len(view):
                raise CheckpointCorruptError(f"chunk at {c.file_offset} is truncated")
            crc = self.check(view, crc)
        if crc & 0xFFFFFFFF != c.crc32:
            raise CheckpointCorruptError(f"checksum mismatch in the chunk at byte {c.file_offset}")

    def copy_chunk(self, i: int, lo: int, hi: int, dest: memoryview) -> None:
        """Copies the part of raw bytes [lo, hi) that chunk ``i`` (loaded) holds into ``dest``."""
        c = self.chunks[i]
        a, b = max(lo, c.raw_offset), min(hi, c.raw_offset + c.raw_len)
        if b > a:
            dest[a - lo : b - lo] = memoryview(self.cache[i])[a - c.raw_offset : b - c.raw_offset]


def needs_reshard(body: dict[str, Any], *, rank: int, world_size: int, into: Any) -> bool:
    """Whether this rank's restore must reshard: another number of saved ranks, or a template
    whose shards (or whole tensors) do not match this rank's saved shards."""
    if int(body["world_size"]) != world_size:
        return True
    if into is None:
        return False
    dests = {ref.key: ref for ref in flatten_state(into)[1]}
    for e in (fmt.TensorEntry.from_json(x) for x in body["ranks"][rank]["tensors"]):
        ref = dests.get(e.key)
        if ref is None:
            continue  # the plain restore names the mismatch
        if list(ref.tensor.shape) != e.shape:
            return True
        moved = ref.dtensor is not None and e.dtensor is not None
        if moved and ref.dtensor.get("offsets") != e.dtensor.get("offsets"):  # type: ignore[union-attr]
            return True
    return False


def load_resharded(
    body: dict[str, Any],
    *,
    rank: int,
    into: Any,
    readers: Callable[[int], Reader],
    pool: ThreadPoolExecutor,
    readers_into: Callable[[int], ReadInto | None] | None = None,
) -> Any:
    """This rank's state from a checkpoint saved by any number of ranks, restored into ``into``.

    ``body`` is the verified manifest; ``readers(r)`` returns saved rank ``r``'s data reader and
    ``readers_into(r)`` (local files) one that reads into memory (``preadv``), or None.
    Raises ``ValueError`` when ``into`` does not fit the checkpoint (another model, a key
    missing, a split along another dimension than 0) and ``CheckpointCorruptError`` on bad data.
    """
    if into is None:
        raise ValueError(
            f"this checkpoint was saved by {body['world_size']} ranks: restoring it on another "
            "number needs into= (the state with this job's sharded tensors)"
        )
    parts = body["ranks"]
    pieces: dict[str, list[_Piece]] = {}
    for r, part in enumerate(parts):
        for e in (fmt.TensorEntry.from_json(x) for x in part["tensors"]):
            offsets, local = _region(e.dtensor, e.shape)
            pieces.setdefault(e.key, []).append(_Piece(r, e, offsets, local))
    own = parts[min(rank, len(parts) - 1)]
    skeleton = fmt.unb64(own["skeleton"])
    if fmt.crc32(skeleton) != int(own["skeleton_crc32"]):
        raise CheckpointCorruptError("skeleton checksum mismatch")
    own_rank = int(own["rank"])
    dests = {ref.key: ref for ref in flatten_state(into)[1]}

    # Plan: for every tensor of the skeleton, a destination and the byte copies that fill it.
    plans: list[tuple[int, int, int, torch.Tensor, int]] = []  # (rank, lo, hi, dest, dest byte)
    tensors: list[torch.Tensor] = []
    for e in (fmt.TensorEntry.from_json(x) for x in own["tensors"]):
        dtype = getattr(torch, e.dtype.removeprefix("torch."))
        ref = dests.get(e.key)
        if (
            e.dtensor is None
            and ref is not None
            and ref.dtensor is not None
            and [int(n) for n in ref.dtensor["global_shape"]] == e.shape
        ):
            # A whole tensor saved unsharded (one plain rank) restored into a DTensor shard.
            whole = {"global_shape": e.shape, "offsets": [0] * len(e.shape), "local_shape": e.shape}
            e = fmt.TensorEntry(e.key, e.dtype, e.shape, e.offset, e.nbytes, whole)
            pieces[e.key] = [_Piece(own_rank, e, [0] * len(e.shape), e.shape)]
        if e.dtensor is None:  # not sharded: this rank's (or rank 0's) own copy
            if ref is not None and list(ref.tensor.shape) == e.shape and ref.tensor.is_contiguous():
                out = (
                    ref.tensor
                    if ref.tensor.device.type == "cpu"
                    else torch.empty_like(ref.tensor, device="cpu")
                )
            else:
                out = torch.empty(e.shape, dtype=dtype)
            tensors.append(out)
            plans.append((own_rank, e.offset, e.offset + e.nbytes, out, 0))
            continue
        if ref is None:
            raise ValueError(f"{e.key}: in the checkpoint but not in the restore template")
        global_shape = [int(n) for n in e.dtensor["global_shape"]]
        t = ref.tensor
        if ref.dtensor is None:
            offsets, local = [0] * t.dim(), list(t.shape)
            if local != global_shape:
                raise ValueError(
                    f"{e.key}: the template holds {local}, the checkpoint's tensor is {global_shape}"
                )
        else:
            offsets, local = _region(ref.dtensor, list(t.shape))
        out = t if t.device.type == "cpu" and t.is_contiguous() else torch.empty(local, dtype=dtype)
        if str(out.dtype) != e.dtype:
            raise ValueError(f"{e.key}: the template is {out.dtype}, the checkpoint {e.dtype}")
        tensors.append(out)
        if out.numel() == 0:
            continue
        if any(
            o != 0 or n != g
            for o, n, g in zip(offsets[1:], local[1:], global_shape[1:], strict=True)
        ):
            raise ValueError(f"{e.key}: only shards split along dimension 0 can be resharded")
        row_bytes = math.prod(global_shape[1:]) * out.element_size()
        lo_row, hi_row = offsets[0], offsets[0] + local[0]
        for p in pieces[e.key]:
            if any(
                o != 0 or n != g
                for o, n, g in zip(p.offsets[1:], p.local_shape[1:], global_shape[1:], strict=True)
            ):
                raise ValueError(f"{e.key}: only shards split along dimension 0 can be resharded")
            a, b = max(lo_row, p.offsets[0]), min(hi_row, p.offsets[0] + p.local_shape[0])
            if a >= b:
                continue
            src_lo = p.entry.offset + (a - p.offsets[0]) * row_bytes
            plans.append(
                (p.rank, src_lo, src_lo + (b - a) * row_bytes, out, (a - lo_row) * row_bytes)
            )

    # Read every chunk the plan touches (in parallel, verified). Uncompressed chunks of a local
    # file are read straight into their destinations (the rest of the chunk into a scratch, for
    # its checksum): one pass. Otherwise a chunk is read whole, verified, then copied out.
    sources: dict[int, Chunks] = {}
    needed: dict[tuple[int, int], list[tuple[int, int, memoryview]]] = {}
    for r, lo, hi, out, at in plans:
        if hi <= lo:
            continue
        src = sources.get(r)
        if src is None:
            src = sources[r] = Chunks(parts[r], readers(r))
        dest = byte_view(out)[at : at + hi - lo]
        for i in src.covering(lo, hi):
            needed.setdefault((r, i), []).append((lo, hi, dest))
    direct = []
    buffered = []
    for (r, i), segs in sorted(needed.items()):
        into_reader = readers_into(r) if readers_into is not None else None
        if into_reader is not None and sources[r].chunks[i].codec == "none":
            direct.append((r, i, segs, into_reader))
        else:
            buffered.append((r, i, segs))
    futures = [pool.submit(sources[r].load, i) for r, i, _ in buffered]
    futures += [pool.submit(sources[r].read_direct, i, segs, rd) for r, i, segs, rd in direct]
    for f in futures:
        f.result()
    for r, i, segs in buffered:
        for lo, hi, dest in segs:
            sources[r].copy_chunk(i, lo, hi, dest)
    return restore_state(skeleton, tensors, into)
