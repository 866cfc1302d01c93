"""zstd as an optional entropy stage over any byte payload, passing through what it cannot shrink."""

from __future__ import annotations

import logging
import struct

import numpy as np
import zstandard

from lowcomm.compression._errors import CodecError

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "byte_shuffle",
    "byte_unshuffle",
    "is_zstd_compressed",
    "zstd_compress",
    "zstd_compress_frame",
    "zstd_decompress",
    "zstd_decompress_frame",
]

logger = logging.getLogger(__name__)

# Container: magic, version, mode. Mode 0 stores the input verbatim (zstd did not pay), mode 1
# holds one zstd frame that records its decompressed size (so a reader can bound it up front).
_MAGIC = b"LZ"
_VERSION = 1
_RAW = 0
_ZSTD = 1
_HEADER = struct.Struct("<2sBB")
HEADER_BYTES = _HEADER.size

# A reader refuses to inflate a frame beyond this unless told otherwise (a tiny frame can claim
# terabytes; we check the claim before allocating).
DEFAULT_MAX_OUTPUT_BYTES = 1 << 34

Buffer = bytes | bytearray | memoryview


def zstd_compress(buf: Buffer, level: int = 3, *, threads: int = 0) -> bytes:
    """Compresses ``buf`` with zstd, or stores it verbatim (flagged) when compression does not pay.

    The result is never more than ``HEADER_BYTES`` (4) bytes larger than the input. Pure function,
    thread-safe; runs on the calling thread unless ``threads`` > 0 (zstd worker threads).

    Args:
        buf: any bytes-like object.
        level: zstd level, 1 (fast) to 22 (small); negative levels trade ratio for speed.
        threads: zstd worker threads; 0 compresses on the calling thread.

    Raises:
        ValueError: ``level`` or ``threads`` out of range.
    """
    if not isinstance(level, int) or isinstance(level, bool) or not -7 <= level <= 22:
        raise ValueError(f"zstd level must be an int in [-7, 22], got {level!r}")
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0, got {threads!r}")
    view = memoryview(buf).cast("B")
    frame = zstd_compress_frame(view, level, threads=threads)
    if frame is None:
        logger.debug("zstd did not pay on %d bytes; stored verbatim", len(view))
        return _HEADER.pack(_MAGIC, _VERSION, _RAW) + view.tobytes()
    return _HEADER.pack(_MAGIC, _VERSION, _ZSTD) + frame


def zstd_compress_frame(buf: Buffer, level: int = 3, *, threads: int = 0) -> bytes | None:
    """One bare zstd frame of ``buf`` (recording its decompressed size), or None if it does not
    shrink ``buf``: the body of ``zstd_compress``'s container, for formats that record elsewhere
    whether a payload is compressed (the checkpoint chunk table). zstd releases the GIL, so
    frames compress in parallel threads. Pure function, thread-safe; the caller checks ``level``.
    """
    view = memoryview(buf).cast("B")
    frame: bytes = zstandard.ZstdCompressor(
        level=level, threads=threads, write_content_size=True
    ).compress(view)
    return None if len(frame) >= len(view) else frame


def byte_shuffle(buf: Buffer, width: int = 4) -> memoryview:
    """``buf``'s ``width``-byte words split by byte significance (every first byte, then every
    second, ...): for fp32 data the exponent bytes sit together, which is what makes weights and
    optimizer moments compress. A copy (numpy's transpose releases the GIL); ``len(buf)`` must be
    a multiple of ``width``.
    """
    arr = np.frombuffer(buf, dtype=np.uint8)
    return np.ascontiguousarray(arr.reshape(-1, width).T).reshape(-1).data


def byte_unshuffle(buf: Buffer, width: int = 4) -> memoryview:
    """Inverse of ``byte_shuffle`` (a copy)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    return np.ascontiguousarray(arr.reshape(width, -1).T).reshape(-1).data


def _parse(blob: Buffer) -> tuple[int, memoryview]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"zstd container must be bytes-like, got {type(blob).__name__}")
    view = memoryview(blob).cast("B")
    if len(view) < HEADER_BYTES:
        raise CodecError(
            f"zstd container truncated: {len(view)} bytes, header needs {HEADER_BYTES}"
        )
    magic, version, mode = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise CodecError(
            f"not a lowcomm zstd container (magic {bytes(magic)!r}, expected {_MAGIC!r})"
        )
    if version != _VERSION:
        raise CodecError(
            f"unsupported zstd container version {version} (this lowcomm reads {_VERSION})"
        )
    if mode not in (_RAW, _ZSTD):
        raise CodecError(f"unknown zstd container mode {mode}")
    return mode, view[HEADER_BYTES:]


def is_zstd_compressed(blob: Buffer) -> bool:
    """Whether a ``zstd_compress`` result holds a zstd frame (True) or the verbatim input (False)."""
    return _parse(blob)[0] == _ZSTD


def zstd_decompress(blob: Buffer, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> bytes:
    """Inverts ``zstd_compress``. Pure function, thread-safe.

    Raises:
        CodecError: the container is truncated, corrupt, not ours, or claims more than
            ``max_output_bytes`` of output.
    """
    mode, body = _parse(blob)
    if mode == _RAW:
        if len(body) > max_output_bytes:
            raise CodecError(
                f"stored payload of {len(body)} bytes exceeds max_output_bytes={max_output_bytes}"
            )
        return body.tobytes()
    return zstd_decompress_frame(body, max_output_bytes=max_output_bytes)


def zstd_decompress_frame(
    frame: Buffer, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
) -> bytes:
    """Inverts ``zstd_compress_frame``. Pure function, thread-safe.

    Raises:
        CodecError: the frame is truncated or corrupt, does not record its decompressed size, or
            claims more than ``max_output_bytes`` of output.
    """
    body = memoryview(frame).cast("B")
    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt zstd frame header: {e}") from e
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise CodecError("zstd frame does not record its decompressed size")
    if size > max_output_bytes:
        raise CodecError(
            f"zstd frame claims {size} bytes, over max_output_bytes={max_output_bytes}"
        )
    try:
        out = zstandard.ZstdDecompressor().decompress(body, max_output_size=max(size, 1))
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt or truncated zstd frame: {e}") from e
    if len(out) != size:
        raise CodecError(f"zstd frame decompressed to {len(out)} bytes, header said {size}")
    return out
