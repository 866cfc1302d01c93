"""Codecs for tensors on the wire and on disk: quantizers, top-k, error feedback, zstd.

    from lowcomm.compression import get_codec, Encoded
    codec = get_codec("int8", block_size=64)
    enc = codec.encode(tensor)               # Encoded: parts + dtype + shape + params
    blob = enc.to_bytes()                    # versioned, checksummed, self-describing
    out = codec.decode(Encoded.from_bytes(blob), out=buffer)

    ef = ErrorFeedback(get_codec("topk"))   # residual per name; sum of decoded -> sum of inputs
    enc = ef.encode("layer0.weight", pseudogradient)

Codecs: "fp16", "bf16", "uint8" (min-max per chunk), "int8" (absmax per block), "fp8" (e4m3,
row or block scales), "fp4" (E2M1/E3M0, block scales), "topk" (packed indices, low-bit values).
Every codec rounds to nearest, documents its error bound in its docstring, and refuses NaN/inf
input with a ValueError. ``Encoded.from_bytes`` raises ``CodecError`` on anything it cannot trust.
CPU and CUDA tensors alike; the encodings are computed with the same IEEE operations on both.
"""

from __future__ import annotations

from lowcomm.compression._cast import Bf16Codec, Fp16Codec
from lowcomm.compression._codec import (
    BaseCodec,
    Codec,
    decode,
    get_codec,
    register_codec,
    resolve_codec,
)
from lowcomm.compression._encoded import FORMAT_VERSION, Encoded
from lowcomm.compression._error_feedback import ErrorFeedback
from lowcomm.compression._errors import CodecError
from lowcomm.compression._fp4 import Fp4Codec
from lowcomm.compression._fp8 import Fp8Codec
from lowcomm.compression._int8 import Int8Codec
from lowcomm.compression._topk import TopKCodec
from lowcomm.compression._uint8 import Uint8Codec
from lowcomm.compression._zstd import (
    byte_shuffle,
    byte_unshuffle,
    is_zstd_compressed,
    zstd_compress,
    zstd_compress_frame,
    zstd_decompress,
    zstd_decompress_frame,
)

__all__ = [
    "FORMAT_VERSION",
    "BaseCodec",
    "Bf16Codec",
    "Codec",
    "CodecError",
    "Encoded",
    "ErrorFeedback",
    "Fp4Codec",
    "Fp8Codec",
    "Fp16Codec",
    "Int8Codec",
    "TopKCodec",
    "Uint8Codec",
    "byte_shuffle",
    "byte_unshuffle",
    "decode",
    "get_codec",
    "is_zstd_compressed",
    "register_codec",
    "resolve_codec",
    "zstd_compress",
    "zstd_compress_frame",
    "zstd_decompress",
    "zstd_decompress_frame",
]
