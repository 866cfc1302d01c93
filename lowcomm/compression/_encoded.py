"""``Encoded``: a codec's output (named tensors plus metadata) and its versioned byte format."""

from __future__ import annotations

import json
import math
import struct
import warnings
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from lowcomm.compression._errors import CodecError
from lowcomm.compression._zstd import (
    DEFAULT_MAX_OUTPUT_BYTES,
    is_zstd_compressed,
    zstd_compress,
    zstd_decompress,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FORMAT_VERSION", "Encoded", "ParamValue", "register_layout"]

ParamValue = int | float | str | bool | None

FORMAT_VERSION = 1
_MAGIC = b"LCEN"
# magic, version, flags, reserved, header_len, header_crc32, payload_len, payload_crc32
_FIXED = struct.Struct("<4sBBHIIQI")
_FLAG_ZSTD = 1
_MAX_HEADER_BYTES = 1 << 16
_MAX_NDIM = 64
_MAX_NUMEL = 1 << 48

# Every dtype that may appear in a header, by a stable name (torch's repr could change).
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

# Filled by _codec.py: codec name -> callable(params) that validates the params and returns the
# expected part layout for a shape. Kept as a hook so this module does not import the codecs.
_LAYOUTS: dict[
    str,
    Callable[
        [Mapping[str, ParamValue], tuple[int, ...]], dict[str, tuple[torch.dtype, tuple[int, ...]]]
    ],
] = {}


def register_layout(
    codec: str,
    layout_fn: Callable[
        [Mapping[str, ParamValue], tuple[int, ...]], dict[str, tuple[torch.dtype, tuple[int, ...]]]
    ],
) -> None:
    """Tells ``Encoded.from_bytes`` how to validate codec ``codec``'s parts (``register_codec``
    calls it)."""
    _LAYOUTS[codec] = layout_fn


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be serialised") from None


class Encoded:
    """One encoded tensor: named payload tensors (codes, scales, ...) plus what decoding needs.

    Produced by ``Codec.encode`` or ``Encoded.from_bytes``; consumed by ``Codec.decode``. Treat it
    as immutable: the serialised form is cached on first use. Not thread-safe for concurrent first
    calls of ``to_bytes``/``nbytes`` (both threads compute the same bytes; harmless).

    Attributes:
        codec: the codec's registered name ("uint8", "int8", ...).
        params: the codec parameters decoding needs (block size, variant, ...), JSON scalars.
        dtype: the dtype ``decode`` returns (the input's).
        shape: the shape ``decode`` returns.
        parts: named tensors, all on one device (CPU after ``from_bytes``).
        zstd_level: when set, ``to_bytes`` runs zstd over the payload (passed through if it does
            not pay; see ``zstd_applied``).
    """

    __slots__ = ("_blob", "_header", "codec", "dtype", "params", "parts", "shape", "zstd_level")

    def __init__(
        self,
        *,
        codec: str,
        params: Mapping[str, ParamValue],
        dtype: torch.dtype,
        shape: tuple[int, ...],
        parts: Mapping[str, torch.Tensor],
        zstd_level: int | None = None,
    ) -> None:
        self.codec = codec
        self.params = dict(params)
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.parts = dict(parts)
        self.zstd_level = zstd_level
        self._header: bytes | None = None
        self._blob: bytes | None = None

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}={tuple(v.shape)}:{dtype_name(v.dtype)}" for k, v in self.parts.items()
        )
        return f"Encoded(codec={self.codec!r}, params={self.params}, dtype={self.dtype}, shape={self.shape}, parts=[{parts}])"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        for t in self.parts.values():
            return t.device
        return torch.device("cpu")

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the raw parts (no header, no zstd)."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def nbytes(self) -> int:
        """Exactly ``len(self.to_bytes())``: what would travel. Computed without copying unless zstd is on."""
        if self.zstd_level is not None:
            return len(self.to_bytes())
        return _FIXED.size + len(self._header_bytes()) + self.payload_nbytes

    @property
    def zstd_applied(self) -> bool | None:
        """None when zstd is off; else whether zstd paid (False: payload stored verbatim)."""
        if self.zstd_level is None:
            return None
        blob = self.to_bytes()
        (hlen,) = struct.unpack_from("<I", blob, 8)
        return is_zstd_compressed(memoryview(blob)[_FIXED.size + hlen :])

    def with_dtype(self, dtype: torch.dtype) -> Encoded:
        """The same payload, decoding to ``dtype`` (error feedback encodes an fp32 accumulator)."""
        return Encoded(
            codec=self.codec,
            params=self.params,
            dtype=dtype,
            shape=self.shape,
            parts=self.parts,
            zstd_level=self.zstd_level,
        )

    # -- serialisation -------------------------------------------------------------------------

    def _header_bytes(self) -> bytes:
        if self._header is None:
            header = {
                "codec": self.codec,
                "params": self.params,
                "dtype": dtype_name(self.dtype),
                "shape": list(self.shape),
                "parts": [[k, dtype_name(v.dtype), list(v.shape)] for k, v in self.parts.items()],
            }
            raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
            # Pad so the payload starts 8-byte aligned: from_bytes views it in place.
            raw += b" " * (-(len(raw) + _FIXED.size) % 8)
            self._header = raw
        return self._header

    def _part_views(self) -> list[memoryview]:
        views = []
        for t in self.parts.values():
            flat = t.detach().reshape(-1)
            if flat.device.type != "cpu":
                flat = flat.cpu()
            arr = flat.contiguous().view(torch.uint8).numpy()
            views.append(memoryview(arr.data))
        return views

    def to_buffers(self) -> list[memoryview | bytes]:
        """The serialised form as a list of buffers whose concatenation is ``to_bytes()``.

        Without zstd the parts are not copied (CPU tensors), so a socket can send them with
        ``sendmsg``. CUDA parts are copied to the host once (a sync point).
        """
        if self._blob is not None:
            return [self._blob]
        header = self._header_bytes()
        if self.zstd_level is not None:
            return [self.to_bytes()]
        views = self._part_views()
        crc = 0
        total = 0
        for v in views:
            crc = zlib.crc32(v, crc)
            total += v.nbytes
        fixed = _FIXED.pack(
            _MAGIC, FORMAT_VERSION, 0, 0, len(header), zlib.crc32(header), total, crc
        )
        return [fixed, header, *views]

    def to_bytes(self) -> bytes:
        """The self-describing serialised form (``Encoded.from_bytes`` inverts it). Cached."""
        if self._blob is None:
            if self.zstd_level is None:
                self._blob = b"".join(self.to_buffers())
            else:
                header = self._header_bytes()
                payload = zstd_compress(b"".join(self._part_views()), self.zstd_level)
                fixed = _FIXED.pack(
                    _MAGIC,
                    FORMAT_VERSION,
                    _FLAG_ZSTD,
                    0,
                    len(header),
                    zlib.crc32(header),
                    len(payload),
                    zlib.crc32(payload),
                )
                self._blob = b"".join([fixed, header, payload])
        return self._blob

    @classmethod
    def from_bytes(
        cls,
        blob: bytes | bytearray | memoryview,
        *,
        max_decoded_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> Encoded:
        """Parses ``to_bytes`` output, checking everything before trusting any of it.

        The parts are CPU tensors that view ``blob`` in place when it is not zstd-compressed (do not
        mutate ``blob`` while they live); a ``bytearray`` or ``memoryview`` is fine.

        Raises:
            TypeError: ``blob`` is not bytes-like.
            CodecError: truncated, trailing bytes, bad magic, unsupported version, checksum
                mismatch, malformed header, unknown codec or parameters, parts inconsistent with
                the shape, or a claimed size over ``max_decoded_bytes``.
        """
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise TypeError(
                f"Encoded.from_bytes needs bytes, bytearray or memoryview, got {type(blob).__name__}"
            )
        view = memoryview(blob).cast("B") if not isinstance(blob, bytes) else memoryview(blob)
        n = len(view)
        if n < _FIXED.size:
            raise CodecError(
                f"encoded payload truncated: {n} bytes, the fixed header alone is {_FIXED.size}"
            )
        magic, version, flags, reserved, hlen, hcrc, plen, pcrc = _FIXED.unpack_from(view)
        if magic != _MAGIC:
            raise CodecError(
                f"not a lowcomm encoded tensor (magic {bytes(magic)!r}, expected {_MAGIC!r})"
            )
        if version != FORMAT_VERSION:
            raise CodecError(
                f"unsupported encoded-tensor format version {version} (this lowcomm reads {FORMAT_VERSION})"
            )
        if flags & ~_FLAG_ZSTD or reserved:
            raise CodecError(
                f"unknown flags {flags:#x} / reserved field {reserved} in encoded header"
            )
        if hlen > _MAX_HEADER_BYTES:
            raise CodecError(
                f"encoded header claims {hlen} bytes, over the {_MAX_HEADER_BYTES}-byte limit"
            )
        expected_total = _FIXED.size + hlen + plen
        if n < expected_total:
            raise CodecError(f"encoded payload truncated: {n} bytes, header says {expected_total}")
        if n > expected_total:
            raise CodecError(
                f"encoded payload has {n - expected_total} trailing bytes after the declared {expected_total}"
            )
        header_raw = view[_FIXED.size : _FIXED.size + hlen]
        if zlib.crc32(header_raw) != hcrc:
            raise CodecError("encoded header checksum mismatch: the header is corrupt")
        payload = view[_FIXED.size + hlen :]
        if zlib.crc32(payload) != pcrc:
            raise CodecError("encoded payload checksum mismatch: the payload is corrupt")
        codec, params, dtype, shape, part_specs = _parse_header(bytes(header_raw))

        layout_fn = _LAYOUTS.get(codec)
        if layout_fn is None:
            raise CodecError(f"unknown codec {codec!r} (known: {sorted(_LAYOUTS)})")
        try:
            expected = layout_fn(params, shape)
        except (TypeError, ValueError) as e:
            raise CodecError(f"bad parameters for codec {codec!r}: {e}") from e
        got = {name: (dt, shp) for name, dt, shp in part_specs}
        if len(got) != len(part_specs) or got != expected:
            raise CodecError(
                f"parts of {codec!r} do not match shape {shape} and params {params}: got {got}, expected {expected}"
            )
        raw_bytes = sum(math.prod(shp) * dt.itemsize for _, dt, shp in part_specs)
        if raw_bytes > max_decoded_bytes:
            raise CodecError(
                f"encoded tensor claims {raw_bytes} payload bytes, over max_decoded_bytes={max_decoded_bytes}"
            )

        if flags & _FLAG_ZSTD:
            data: bytes | memoryview = zstd_decompress(payload, max_output_bytes=raw_bytes)
            if len(data) != raw_bytes:
                raise CodecError(
                    f"decompressed payload is {len(data)} bytes, the parts need {raw_bytes}"
                )
        else:
            if plen != raw_bytes:
                raise CodecError(f"payload is {plen} bytes, the parts need {raw_bytes}")
            data = payload

        parts: dict[str, torch.Tensor] = {}
        offset = 0
        with warnings.catch_warnings():
            # frombuffer warns that a bytes object is not writable; decode only reads the parts.
            warnings.simplefilter("ignore", UserWarning)
            for name, dt, shp in part_specs:
                count = math.prod(shp)
                size = count * dt.itemsize
                if count == 0:
                    t = torch.empty(shp, dtype=dt)
                else:
                    t = (
                        torch.frombuffer(data, dtype=torch.uint8, count=size, offset=offset)
                        .view(dt)
                        .view(shp)
                    )
                parts[name] = t
                offset += size
        enc = cls(
            codec=codec, params=params, dtype=dtype, shape=shape, parts=parts, zstd_level=None
        )
        return enc


def _parse_header(
    raw: bytes,
) -> tuple[
    str,
    dict[str, ParamValue],
    torch.dtype,
    tuple[int, ...],
    list[tuple[str, torch.dtype, tuple[int, ...]]],
]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting recurses
        raise CodecError(f"encoded header is not valid JSON: {e}") from e
    if not isinstance(header, dict) or set(header) != {
        "codec",
        "params",
        "dtype",
        "shape",
        "parts",
    }:
        raise CodecError(
            f"encoded header has the wrong fields: {sorted(header) if isinstance(header, dict) else type(header).__name__}"
        )
    codec = header["codec"]
    if not isinstance(codec, str):
        raise CodecError("encoded header field 'codec' is not a string")
    params = header["params"]
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, int | float | str | bool))
        for k, v in params.items()
    ):
        raise CodecError("encoded header field 'params' is not a flat object of scalars")
    dtype = _parse_dtype(header["dtype"], "dtype")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise CodecError(f"encoded header dtype {header['dtype']!r} is not a floating dtype")
    shape = _parse_shape(header["shape"], "shape")
    parts_raw = header["parts"]
    if not isinstance(parts_raw, list) or len(parts_raw) > 16:
        raise CodecError("encoded header field 'parts' is not a list of at most 16 entries")
    specs = []
    for p in parts_raw:
        if not isinstance(p, list) or len(p) != 3 or not isinstance(p[0], str):
            raise CodecError(f"encoded header part {p!r} is not [name, dtype, shape]")
        specs.append(
            (
                p[0],
                _parse_dtype(p[1], f"parts.{p[0]}.dtype"),
                _parse_shape(p[2], f"parts.{p[0]}.shape"),
            )
        )
    return codec, params, dtype, shape, specs


def _parse_dtype(value: object, field: str) -> torch.dtype:
    if not isinstance(value, str) or value not in _DTYPES:
        raise CodecError(f"encoded header field {field!r} has unknown dtype {value!r}")
    return _DTYPES[value]


def _parse_shape(value: object, field: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > _MAX_NDIM
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= _MAX_NUMEL for s in value
        )
    ):
        raise CodecError(
            f"encoded header field {field!r} is not a list of at most {_MAX_NDIM} non-negative ints: {value!r}"
        )
    shape = tuple(value)
    if math.prod(shape) > _MAX_NUMEL:
        raise CodecError(
            f"encoded header field {field!r} claims {math.prod(shape)} elements, over the limit {_MAX_NUMEL}"
        )
    return shape
