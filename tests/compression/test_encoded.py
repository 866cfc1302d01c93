"""The byte format of Encoded: round trips, zero-copy buffers, and every corruption rejected."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from lowcomm.compression import CodecError, Encoded, get_codec
from lowcomm.errors import LowcommError

FIXED = struct.Struct("<4sBBHIIQI")


def blob_of(name: str = "int8", n: int = 1000, **kwargs: object) -> bytes:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return get_codec(name, **kwargs).encode(x).to_bytes()


def reseal(header: dict[str, object], payload: bytes, *, version: int = 1, flags: int = 0) -> bytes:
    """Builds a blob with valid checksums around a (possibly malicious) header."""
    raw = json.dumps(header).encode()
    fixed = FIXED.pack(
        b"LCEN", version, flags, 0, len(raw), zlib.crc32(raw), len(payload), zlib.crc32(payload)
    )
    return fixed + raw + payload


def split(blob: bytes) -> tuple[dict[str, object], bytes]:
    hlen = FIXED.unpack_from(blob)[4]
    return json.loads(blob[FIXED.size : FIXED.size + hlen]), blob[FIXED.size + hlen :]


def test_codec_error_is_a_lowcomm_error_and_a_value_error() -> None:
    assert issubclass(CodecError, LowcommError) and issubclass(CodecError, ValueError)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_from_bytes_accepts_any_bytes_like_and_round_trips(kind: type) -> None:
    x = torch.randn(17, 31)
    codec = get_codec("uint8", block_size=100)
    enc = codec.encode(x)
    back = Encoded.from_bytes(kind(enc.to_bytes()))
    assert back.codec == "uint8" and back.shape == (17, 31) and back.dtype == torch.float32
    assert back.params == {"block_size": 100}
    assert torch.equal(codec.decode(back), codec.decode(enc))


def test_to_buffers_concatenate_to_to_bytes_and_do_not_copy_parts() -> None:
    enc = get_codec("int8").encode(torch.randn(4096))
    bufs = enc.to_buffers()
    assert b"".join(bufs) == enc.to_bytes()
    codes = enc.parts["codes"]
    assert any(
        isinstance(b, memoryview)
        and torch.frombuffer(b, dtype=torch.uint8).data_ptr() == codes.data_ptr()
        for b in bufs
    )


def test_payload_starts_8_byte_aligned() -> None:
    blob = blob_of("int8", 999)
    hlen = FIXED.unpack_from(blob)[4]
    assert (FIXED.size + hlen) % 8 == 0


def test_bf16_and_empty_tensors_serialise() -> None:
    for x in (torch.randn(5, 3).bfloat16(), torch.empty(0, 4), torch.tensor(3.5)):
        for name in ("bf16", "int8", "uint8"):
            codec = get_codec(name)
            enc = Encoded.from_bytes(codec.encode(x).to_bytes())
            y = codec.decode(enc)
            assert y.shape == x.shape and y.dtype == x.dtype


def test_every_truncation_is_rejected() -> None:
    blob = blob_of("int8", 100)
    for cut in range(len(blob)):
        with pytest.raises(CodecError):
            Encoded.from_bytes(blob[:cut])


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(CodecError, match="trailing"):
        Encoded.from_bytes(blob_of() + b"\0")


def test_every_single_bit_flip_is_rejected() -> None:
    blob = blob_of("uint8", 40)
    for i in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(CodecError):
                Encoded.from_bytes(bad)


def test_garbage_is_rejected_with_a_clear_error() -> None:
    g = torch.Generator().manual_seed(1)
    for n in (0, 3, 27, 28, 100, 5000):
        junk = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
        with pytest.raises(CodecError, match=r"truncated|magic"):
            Encoded.from_bytes(junk)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + bytes([2]) + b[5:], "version 2"),
        (lambda b: b[:5] + bytes([0x80]) + b[6:], "flags"),
        (lambda b: b[:8] + struct.pack("<I", 1 << 20) + b[12:], "limit"),
        (lambda b: b[:16] + struct.pack("<Q", 1 << 40) + b[24:], "truncated"),
    ],
    ids=["magic", "version", "flags", "huge-header", "huge-payload"],
)
def test_corrupt_fixed_header_fields_are_named(mutate: object, match: str) -> None:
    assert callable(mutate)
    with pytest.raises(CodecError, match=match):
        Encoded.from_bytes(mutate(blob_of()))


def test_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="bytes"):
        Encoded.from_bytes("not bytes")  # type: ignore[arg-type]


def _header_cases() -> list[tuple[str, object, str]]:
    return [
        ("codec", "int9", "unknown codec 'int9'"),
        ("codec", 5, "'codec' is not a string"),
        ("params", {"block_size": 0}, "bad parameters"),
        ("params", {"block_size": 64, "evil": 1}, "bad parameters"),
        ("params", [1], "params"),
        ("dtype", "int8", "not a floating dtype"),
        ("dtype", "complex", "unknown dtype"),
        ("shape", [-1], "non-negative"),
        ("shape", [1.5], "non-negative"),
        ("shape", "10", "non-negative"),
        ("shape", [1 << 30, 1 << 30], "over the limit"),
        ("shape", [999], "do not match"),
        ("parts", [], "do not match"),
        ("parts", "x", "list"),
        ("parts", [["scales", "float32"]], "name, dtype, shape"),
        ("parts", [["scales", "float32", [16]], ["codes", "uint8", [1000]]], "do not match"),
    ]


@pytest.mark.parametrize(("field", "value", "match"), _header_cases(), ids=lambda v: str(v)[:20])
def test_malformed_header_fields_are_rejected_even_with_valid_checksums(
    field: str, value: object, match: str
) -> None:
    header, payload = split(blob_of("int8", 1000))
    header[field] = value
    with pytest.raises(CodecError, match=match):
        Encoded.from_bytes(reseal(header, payload))


def test_missing_or_extra_header_fields_are_rejected() -> None:
    header, payload = split(blob_of())
    del header["dtype"]
    with pytest.raises(CodecError, match="wrong fields"):
        Encoded.from_bytes(reseal(header, payload))
    header, payload = split(blob_of())
    header["extra"] = 1
    with pytest.raises(CodecError, match="wrong fields"):
        Encoded.from_bytes(reseal(header, payload))


def test_non_json_header_is_rejected() -> None:
    _, payload = split(blob_of())
    raw = b"\xff{not json"
    fixed = FIXED.pack(
        b"LCEN", 1, 0, 0, len(raw), zlib.crc32(raw), len(payload), zlib.crc32(payload)
    )
    with pytest.raises(CodecError, match="JSON"):
        Encoded.from_bytes(fixed + raw + payload)


def test_deeply_nested_header_is_rejected_not_a_recursion_error() -> None:
    _, payload = split(blob_of())
    raw = b"[" * 60_000
    fixed = FIXED.pack(
        b"LCEN", 1, 0, 0, len(raw), zlib.crc32(raw), len(payload), zlib.crc32(payload)
    )
    with pytest.raises(CodecError, match="JSON"):
        Encoded.from_bytes(fixed + raw + payload)


def test_payload_shorter_than_the_parts_is_rejected() -> None:
    header, payload = split(blob_of("int8", 1000))
    with pytest.raises(CodecError, match="payload is"):
        Encoded.from_bytes(reseal(header, payload[:-1]))


def test_a_claim_over_max_decoded_bytes_is_rejected_before_allocating() -> None:
    blob = blob_of("int8", 1000)
    with pytest.raises(CodecError, match="max_decoded_bytes"):
        Encoded.from_bytes(blob, max_decoded_bytes=100)


def test_zstd_payload_round_trips_and_reports_whether_it_paid() -> None:
    x = torch.zeros(10_000)
    x[::100] = 1.0
    codec = get_codec("int8", zstd_level=3)
    enc = codec.encode(x)
    assert enc.zstd_applied is True
    assert enc.nbytes == len(enc.to_bytes()) < get_codec("int8").encode(x).nbytes // 10
    assert torch.equal(codec.decode(Encoded.from_bytes(enc.to_bytes())), x)

    noise = get_codec("int8", zstd_level=3).encode(torch.randn(10_000))
    plain = get_codec("int8").encode(torch.randn(10_000))
    assert noise.zstd_applied in (True, False)
    # Never inflated by more than the container's 4-byte header.
    assert noise.nbytes <= plain.nbytes + 4
    assert get_codec("int8").encode(x).zstd_applied is None


def test_zstd_bomb_claiming_more_than_the_parts_is_rejected() -> None:
    from lowcomm.compression import zstd_compress

    header, _ = split(blob_of("int8", 1000))
    bomb = zstd_compress(bytes(10_000_000), 3)
    with pytest.raises(CodecError, match="claims"):
        Encoded.from_bytes(reseal(header, bomb, flags=1))


@pytest.mark.parametrize("name", ["uint8", "int8", "fp8", "fp4", "topk", "bf16"])
@pytest.mark.parametrize("zstd_level", [None, 3])
def test_random_mutations_always_raise_codec_error_and_nothing_else(
    name: str, zstd_level: int | None
) -> None:
    x = torch.randn(3000, generator=torch.Generator().manual_seed(4))
    x[::7] = 0.0  # something zstd can shrink
    blob = get_codec(name, zstd_level=zstd_level).encode(x).to_bytes()
    g = torch.Generator().manual_seed(5)
    for trial in range(150):
        bad = bytearray(blob)
        kind = trial % 3
        pos = int(torch.randint(0, len(bad), (1,), generator=g))
        if kind == 0:  # overwrite a short run with random bytes
            run = torch.randint(0, 256, (8,), dtype=torch.uint8, generator=g).tolist()
            bad[pos : pos + 8] = bytes(run)[: len(bad) - pos]
            if bytes(bad) == blob:
                continue
        elif kind == 1:  # delete a byte
            del bad[pos]
        else:  # insert a byte
            bad.insert(pos, int(torch.randint(0, 256, (1,), generator=g)))
        with pytest.raises(CodecError):
            Encoded.from_bytes(bytes(bad))
