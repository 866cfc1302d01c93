"""What a ring all-reduce puts on the wire: its frame kind, the operation descriptor in each frame's
``seq``, and the raw layout of a quantized sub-chunk (the codec's parts, then their crc32c on a ring
whose frames are not sealed; a sealed frame's AEAD tag already authenticates every byte, so a
protected ring sends and checks no crc32c).

Both sides derive every layout from the codec and the sub-chunk's size, so a frame carries nothing
but data: a receiver reads a quantized sub-chunk straight into place, checks it and decodes views of
it (no header parsing, no copies). A zstd codec's output travels in the codec's own
self-describing, checksummed format instead (``Encoded.to_bytes``).
"""

from __future__ import annotations

import struct
from typing import Any

import crc32c
import numpy as np
import torch

from lowcomm._tensors import byte_view
from lowcomm.comm._ops import OPS
from lowcomm.comm.errors import CommError, ProtocolError
from lowcomm.compression import Codec, Encoded

__all__ = [
    "KIND_RING_DATA",
    "Layout",
    "Payload",
    "decode_add_into",
    "decode_into",
    "describe",
    "op_descriptor",
    "pack",
    "unpack",
]

# The ring's data frames (kinds 16-63 belong to the data plane; see _frames).
KIND_RING_DATA = 16
_CRC = struct.Struct("<I")
# What a sending thread sends: one buffer, or several that travel as one frame.
Payload = bytes | bytearray | memoryview | list[Any]


def op_descriptor(op: str, *, quantized: bool) -> int:
    """The top byte of every frame's ``seq`` in an all-reduce: the op and whether it is quantized,
    so that peers that disagree on what they are doing fail with a ProtocolError instead of
    computing garbage."""
    return (OPS.index(op) | (0x10 if quantized else 0)) << 24


def describe(desc: int) -> str:
    """An operation descriptor's top byte (``seq >> 24``) in words, for error messages."""
    op = OPS[desc & 0x3] if desc & 0x3 < len(OPS) else "?"
    return f"op={op!r} {'quantized' if desc & 0x10 else 'unquantized'}"


class Layout:
    """What the raw wire form of one quantized sub-chunk of ``numel`` values looks like: the
    ``Encoded`` parts of the codec, in order, then (``checksum``) a crc32c of them (4 bytes,
    little endian).

    A codec's part layout depends only on its parameters and the shape (``Encoded.from_bytes``
    relies on the same), so both sides derive it from a template encoding of zeros; the frame
    then carries nothing but the parts' bytes and the checksum, and the receiver reads them
    straight into place and decodes views of them (no header parsing, no copies)."""

    __slots__ = ("checksum", "codec_name", "nbytes", "params", "parts")

    def __init__(self, codec: Codec, numel: int, *, checksum: bool = True) -> None:
        template = codec.encode(torch.zeros(numel, dtype=torch.float32))
        self.codec_name: str = template.codec
        self.params: dict[str, Any] = dict(template.params)
        self.parts: list[tuple[str, torch.dtype, tuple[int, ...], int]] = [
            (name, t.dtype, tuple(t.shape), t.numel() * t.element_size())
            for name, t in template.parts.items()
        ]
        self.checksum = checksum
        self.nbytes = sum(p[3] for p in self.parts) + (_CRC.size if checksum else 0)


def pack(layout: Layout, enc: Encoded, numel: int) -> list[Any]:
    """The raw wire form of ``enc`` (see ``Layout``) as buffers that view its parts."""
    views: list[Any] = []
    crc = 0
    for name, dtype, shape, _nbytes in layout.parts:
        t = enc.parts.get(name)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            raise CommError(
                f"codec {layout.codec_name!r} produced part {name!r} unlike its layout for "
                f"{numel} values: its layout must depend on the shape and parameters only"
            )
        view = byte_view(t.contiguous())
        if layout.checksum:
            crc = crc32c.crc32c(view, crc)
        views.append(view)
    if layout.checksum:
        views.append(_CRC.pack(crc))
    return views


def unpack(layout: Layout, buf: np.ndarray[Any, np.dtype[np.uint8]], numel: int) -> Encoded:
    """Checks the crc32c of a received raw sub-chunk (if its layout has one); returns an
    ``Encoded`` viewing it."""
    body = buf
    if layout.checksum:
        body = buf[: -_CRC.size]
        (expected,) = _CRC.unpack(buf[-_CRC.size :].tobytes())
        if crc32c.crc32c(body.data) != expected:
            raise ProtocolError(
                "a quantized sub-chunk failed its crc32c check: the data was corrupted in transit"
            )
    parts: dict[str, torch.Tensor] = {}
    offset = 0
    for name, dtype, shape, nbytes in layout.parts:
        raw = torch.from_numpy(body[offset : offset + nbytes])
        parts[name] = (raw.view(dtype) if nbytes else torch.empty(0, dtype=dtype)).view(shape)
        offset += nbytes
    return Encoded(
        codec=layout.codec_name,
        params=layout.params,
        dtype=torch.float32,
        shape=(numel,),
        parts=parts,
    )


def decode_into(
    codec: Codec, blob: Encoded | bytes | bytearray | memoryview, out: torch.Tensor
) -> None:
    """Decodes received bytes (or an ``Encoded`` this peer just made) into ``out``."""
    try:
        enc = Encoded.from_bytes(blob) if isinstance(blob, bytes | bytearray | memoryview) else blob
        decoded = codec.decode(enc, out=out)
    except ValueError as exc:  # CodecError is a ValueError
        raise ProtocolError(f"a quantized sub-chunk did not decode: {exc}") from exc
    if decoded.numel() != out.numel():
        raise ProtocolError(
            f"a quantized sub-chunk decoded to {decoded.numel()} values, expected {out.numel()}"
        )
    if decoded.data_ptr() != out.data_ptr():
        out.copy_(decoded)


def decode_add_into(
    codec: Codec,
    blob: Encoded | bytes | bytearray | memoryview,
    out: torch.Tensor,
    addend: torch.Tensor,
) -> bool:
    """``out = decode(blob) + addend`` in one fused pass where the codec has one
    (``decode_add``); returns False (nothing done) where it has not."""
    fused = getattr(codec, "decode_add", None)
    if fused is None:
        return False
    try:
        enc = Encoded.from_bytes(blob) if isinstance(blob, bytes | bytearray | memoryview) else blob
        fused(enc, out, addend)
    except ValueError as exc:  # CodecError is a ValueError
        raise ProtocolError(f"a quantized sub-chunk did not decode: {exc}") from exc
    return True
