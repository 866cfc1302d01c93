"""zstd_compress / zstd_decompress: round trips, passthrough when it does not pay, corruption."""

from __future__ import annotations

import os

import pytest

from lowcomm.compression import CodecError, is_zstd_compressed, zstd_compress, zstd_decompress


@pytest.mark.parametrize("data", [b"", b"a", b"abc" * 10_000, bytes(1 << 20)])
@pytest.mark.parametrize("level", [1, 3, 19, -1])
def test_round_trip_is_exact(data: bytes, level: int) -> None:
    assert zstd_decompress(zstd_compress(data, level)) == data


def test_compressible_data_shrinks_and_is_flagged() -> None:
    blob = zstd_compress(bytes(100_000))
    assert is_zstd_compressed(blob) and len(blob) < 1000


def test_incompressible_data_is_passed_through_flagged_not_inflated() -> None:
    data = os.urandom(100_000)
    blob = zstd_compress(data, 19)
    assert not is_zstd_compressed(blob)
    assert len(blob) == len(data) + 4
    assert zstd_decompress(memoryview(blob)) == data


def test_bytearray_and_memoryview_inputs_work() -> None:
    data = bytearray(b"xyz" * 1000)
    assert zstd_decompress(zstd_compress(memoryview(data))) == bytes(data)


def test_bad_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="level"):
        zstd_compress(b"x", 23)
    with pytest.raises(ValueError, match="level"):
        zstd_compress(b"x", 1.5)  # type: ignore[arg-type]


def test_corrupt_containers_raise_codec_error_naming_the_problem() -> None:
    good = zstd_compress(b"hello world " * 1000)
    with pytest.raises(CodecError, match="truncated"):
        zstd_decompress(good[:2])
    with pytest.raises(CodecError, match="magic"):
        zstd_decompress(b"QQ" + good[2:])
    with pytest.raises(CodecError, match="version"):
        zstd_decompress(good[:2] + b"\x09" + good[3:])
    with pytest.raises(CodecError, match="mode"):
        zstd_decompress(good[:3] + b"\x07" + good[4:])
    with pytest.raises(CodecError, match="zstd frame"):
        zstd_decompress(good[:4] + b"garbage" * 10)
    with pytest.raises(CodecError, match="corrupt or truncated"):
        zstd_decompress(good[:-5])
    with pytest.raises(TypeError):
        zstd_decompress("text")  # type: ignore[arg-type]


def test_a_bomb_over_max_output_bytes_is_rejected_before_inflating() -> None:
    blob = zstd_compress(bytes(50_000_000))
    with pytest.raises(CodecError, match="claims 50000000 bytes"):
        zstd_decompress(blob, max_output_bytes=1_000_000)
    raw = zstd_compress(os.urandom(1000))
    with pytest.raises(CodecError, match="exceeds"):
        zstd_decompress(raw, max_output_bytes=10)
