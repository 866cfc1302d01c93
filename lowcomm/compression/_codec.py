"""The codec seam: the ``Codec`` protocol, the shared encode/decode plumbing, and the registry."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from lowcomm.compression._encoded import Encoded, ParamValue, register_layout

__all__ = ["Codec", "decode", "get_codec", "register_codec", "resolve_codec"]

# Scales below this flush their block to zero: dividing by them would overflow fp32 (127/1e-37 is
# inf). The absolute error this adds is below 2**-100, far under anything a model can see.
TINY = 2.0**-100

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@runtime_checkable
class Codec(Protocol):
    """Turns a float tensor into a compact ``Encoded`` and back.

    Implementations are immutable configuration objects; ``encode`` and ``decode`` are pure
    functions of their arguments, so one codec may be shared across threads.
    """

    @property
    def name(self) -> str: ...

    def encode(self, tensor: torch.Tensor) -> Encoded:
        """Encodes a float tensor (fp32/fp16/bf16/fp64, any shape, CPU or CUDA); never mutates it."""
        ...

    def decode(self, encoded: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decodes into a new tensor of the original dtype and shape, or into ``out``."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseCodec:
    """Shared plumbing: input checks, the fp32 working copy, ``out=`` handling, zstd.

    Subclasses set ``name``, implement ``_layout`` (the parts a shape needs), ``_encode_flat``
    (fp32 1-D contiguous input -> parts) and ``_decode_flat`` (parts -> a 1-D fp32 ``out``).
    Decoding reads its parameters from the ``Encoded`` (self-describing), not from ``self``.

    Attributes:
        zstd_level: when set, ``Encoded.to_bytes`` compresses the payload with zstd at this level
            (and stores it verbatim when that does not pay). None: no zstd.
    """

    name: ClassVar[str] = ""
    zstd_level: int | None = None

    def __post_init__(self) -> None:
        if self.zstd_level is not None and (
            not isinstance(self.zstd_level, int)
            or isinstance(self.zstd_level, bool)
            or not -7 <= self.zstd_level <= 22
        ):
            raise ValueError(
                f"zstd_level must be None or an int in [-7, 22], got {self.zstd_level!r}"
            )

    # -- what subclasses provide ---------------------------------------------------------------

    def _layout(self, shape: tuple[int, ...]) -> Layout:
        raise NotImplementedError

    def _encode_flat(self, x: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decode_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------

    def params(self) -> dict[str, ParamValue]:
        """The parameters decoding needs (everything but zstd_level)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "zstd_level"
        }

    def encode(self, tensor: torch.Tensor) -> Encoded:
        """Encodes ``tensor``; see the class docstring for the scheme and its error bound.

        Blocking (on CUDA: one host sync for the finiteness check). Thread-safe.

        Raises:
            TypeError: not a tensor.
            ValueError: not a floating dtype, or it holds NaN/inf (or values the format cannot
                represent); nothing is encoded.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{self.name} codec encodes a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{self.name} codec encodes fp32/fp16/bf16/fp64 tensors, got {tensor.dtype}"
            )
        shape = tuple(tensor.shape)
        x = tensor.detach().reshape(-1)
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        x = x.contiguous()
        parts = self._encode_flat(x, shape)
        return Encoded(
            codec=self.name,
            params=self.params(),
            dtype=tensor.dtype,
            shape=shape,
            parts=parts,
            zstd_level=self.zstd_level,
        )

    def decode(
        self,
        encoded: Encoded,
        out: torch.Tensor | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Decodes ``encoded`` into a new tensor (original dtype and shape) or into ``out``.

        Args:
            encoded: from this codec's ``encode`` or ``Encoded.from_bytes``.
            out: optional destination: any floating dtype, same number of elements; written in
                place (directly when it is contiguous fp32, else through a temporary) and returned.
            device: where a new tensor goes when ``out`` is None (default: the parts' device).

        Raises:
            ValueError: ``encoded`` belongs to another codec, its parts are inconsistent, or
                ``out`` has the wrong size or dtype.
        """
        cfg, parts, out = self._prepare_decode(encoded, out, device)
        if out.dtype == torch.float32 and out.is_contiguous():
            cfg._decode_flat(parts, out.view(-1), encoded.shape)
        else:
            tmp = torch.empty(out.numel(), dtype=torch.float32, device=out.device)
            cfg._decode_flat(parts, tmp, encoded.shape)
            out.copy_(tmp.view(out.shape))
        return out

    def decode_add(self, encoded: Encoded, out: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
        """``out = decode(encoded) + addend`` (the ring's reduce-scatter step), bit for bit what
        ``decode`` then ``out.add_(addend)`` give, in fewer passes over memory where the codec
        fuses them (uint8: piece by piece, each piece decoded and added while in cache).
        ``out`` and ``addend``: contiguous fp32, the payload's number of elements, not
        overlapping.

        Raises:
            ValueError: as ``decode``, or ``out``/``addend`` not contiguous fp32 of that size.
        """
        for name, t in (("out", out), ("addend", addend)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"decode_add needs a contiguous fp32 {name}")
        if addend.numel() != out.numel():
            raise ValueError(f"addend has {addend.numel()} elements, out {out.numel()}")
        cfg, parts, out = self._prepare_decode(encoded, out, None)
        cfg._decode_add_flat(parts, out.view(-1), addend.view(-1))
        return out

    def _decode_add_flat(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, addend: torch.Tensor
    ) -> None:
        """``out = decode + addend``; codecs with a fused kernel override it."""
        self._decode_flat(parts, out, (out.numel(),))
        out.add_(addend)

    def _prepare_decode(
        self, encoded: Encoded, out: torch.Tensor | None, device: torch.device | str | None
    ) -> tuple[BaseCodec, dict[str, torch.Tensor], torch.Tensor]:
        """Checks ``encoded`` against this codec and ``out``; (the decoding config, the parts on
        ``out``'s device, ``out`` or a new tensor)."""
        if not isinstance(encoded, Encoded):
            raise TypeError(f"decode needs an Encoded, got {type(encoded).__name__}")
        if encoded.codec != self.name:
            raise ValueError(f"{self.name} codec cannot decode a {encoded.codec!r} payload")
        cfg = self if encoded.params == self.params() else _from_params(type(self), encoded.params)
        expected = cfg._layout(encoded.shape)
        got = {k: (v.dtype, tuple(v.shape)) for k, v in encoded.parts.items()}
        if got != expected:
            raise ValueError(
                f"{self.name} payload parts {got} do not match shape {encoded.shape}: expected {expected}"
            )
        numel = math.prod(encoded.shape)
        if out is None:
            target = torch.device(device) if device is not None else encoded.device
            out = torch.empty(encoded.shape, dtype=encoded.dtype, device=target)
        else:
            if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
                raise ValueError("out must be a floating-point tensor")
            if out.numel() != numel:
                raise ValueError(
                    f"out has {out.numel()} elements, the payload decodes to {numel} (shape {encoded.shape})"
                )
        parts = {
            k: v.to(out.device, non_blocking=True) if v.device != out.device else v
            for k, v in encoded.parts.items()
        }
        return cfg, parts, out


def div(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t / c`` by IEEE division on every device.

    CUDA turns a division by a Python scalar into a multiplication by its reciprocal (and
    ``c / t`` into ``t.reciprocal() * c``), which differs from the CPU in the last bit; dividing
    by a tensor of the same device divides exactly on both, so CPU and GPU encodings agree.
    Only used on the small per-block statistics.
    """
    return t / torch.full_like(t, c)


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` by IEEE division on every device (see ``div``)."""
    return torch.full_like(t, c) / t


def check_finite(stat: torch.Tensor, codec: str) -> None:
    """Raises ValueError when a reduction over the input (min/max/absmax) is NaN or inf.

    The reductions propagate NaN and inf, so checking them costs nothing extra (one host sync).
    """
    if stat.numel() and not bool(torch.isfinite(stat).all()):
        raise ValueError(
            f"{codec} codec: input contains NaN or inf (or its range overflows fp32); refusing to encode it"
        )


def block_views(x: torch.Tensor, block: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Splits a 1-D tensor into (first block index, 2-D view) pieces: full blocks, then the tail.

    Views, not copies: a tensor that is not a multiple of ``block`` costs nothing extra.
    """
    n = x.numel()
    full = n // block
    if full:
        yield 0, x[: full * block].view(full, block)
    if n % block:
        yield full, x[full * block :].view(1, n % block)


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


_REGISTRY: dict[str, type[BaseCodec]] = {}


def _from_params(cls: type[BaseCodec], params: Mapping[str, Any]) -> BaseCodec:
    names = {f.name for f in dataclasses.fields(cls)} - {"zstd_level"}
    unknown = set(params) - names
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)} for codec {cls.name!r}")
    return cls(**params)


def register_codec(cls: type[BaseCodec]) -> type[BaseCodec]:
    """Class decorator: makes ``cls`` available to ``get_codec`` and ``Encoded.from_bytes``."""
    _REGISTRY[cls.name] = cls
    register_layout(cls.name, lambda params, shape: _from_params(cls, params)._layout(shape))
    return cls


def get_codec(name: str, **kwargs: Any) -> BaseCodec:
    """Returns a codec by name: "fp16", "bf16", "uint8", "int8", "fp8", "fp4", "topk".

    Keyword arguments go to the codec's config (for example ``block_size=64``, ``zstd_level=3``).

    Raises:
        ValueError: unknown name, or a parameter out of range.
        TypeError: a parameter the codec does not have.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(_REGISTRY)}") from None
    return cls(**kwargs)


def resolve_codec(codec: str | Codec | None) -> Codec | None:
    """What an all-reduce's ``quantization=`` argument means, for every backend alike.

    ``None`` or ``"none"`` -> None (send the tensor as is); a codec name -> ``get_codec(name)`` with
    its defaults; a ``Codec`` -> itself.

    Raises:
        ValueError: an unknown codec name.
    """
    if codec is None or codec == "none":
        return None
    if isinstance(codec, str):
        return get_codec(codec)
    return codec


def decode(
    encoded: Encoded, out: torch.Tensor | None = None, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Decodes any ``Encoded`` with the codec it names (see ``BaseCodec.decode``)."""
    if not isinstance(encoded, Encoded):
        raise TypeError(f"decode needs an Encoded, got {type(encoded).__name__}")
    try:
        cls = _REGISTRY[encoded.codec]
    except KeyError:
        raise ValueError(f"unknown codec {encoded.codec!r}; known: {sorted(_REGISTRY)}") from None
    return _from_params(cls, encoded.params).decode(encoded, out, device=device)


def check_block_size(value: object, field: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 30:
        raise ValueError(
            f"{field} must be an int in [1, 2**30]{' or None' if allow_none else ''}, got {value!r}"
        )
