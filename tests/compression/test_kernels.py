"""The fast uint8 kernels against their plain forms: rounding by 2**23, pieces, decode_add."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lowcomm.compression import Encoded, get_codec
from lowcomm.compression import _uint8 as uint8_module

# Sizes around the piece (2**18 values) and block (65536) boundaries, a ragged tail, one block.
SIZES = [1, 1000, 65536, 65537, (1 << 18) + 3, 3 * (1 << 18) + 12345]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("block_size", [65536, 1000, None])
def test_uint8_codes_are_the_same_with_and_without_the_fast_rounding(
    numel: int, block_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = get_codec("uint8", block_size=block_size)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    x[::7] = 0.5  # values that land on exact halves after scaling somewhere
    fast = codec.encode(x)
    assert uint8_module._NP_MAGIC_OK, "numpy's int32 -> uint8 cast does not wrap here"
    monkeypatch.setattr(uint8_module, "_NUMPY", False)  # the torch kernels
    torch_fast = codec.encode(x)
    assert uint8_module._MAGIC_OK, "the int32 -> uint8 cast does not wrap here"
    monkeypatch.setattr(uint8_module, "_MAGIC_OK", False)
    monkeypatch.setattr(uint8_module, "_PIECE", 1 << 40)  # one piece: the plain passes
    slow = codec.encode(x)
    for name in slow.parts:
        assert torch.equal(fast.parts[name], slow.parts[name]), name
        assert torch.equal(torch_fast.parts[name], slow.parts[name]), name
    # And against the obvious formula.
    block = numel if block_size is None else block_size
    for i in range(0, numel, block):
        b = x[i : i + block]
        lo, hi = b.min(), b.max()
        if hi - lo > 2.0**-100:
            q = torch.round((b - lo) * (torch.tensor(255.0) / (hi - lo)))
            assert torch.equal(fast.parts["codes"][i : i + block], q.to(torch.uint8))


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("name", ["uint8", "int8"])
def test_decode_add_is_bit_for_bit_decode_then_add(numel: int, name: str) -> None:
    codec = get_codec(name)
    gen = torch.Generator().manual_seed(7)
    enc = codec.encode(torch.randn(numel, generator=gen))
    addend = torch.randn(numel, generator=gen)
    expected = codec.decode(enc, out=torch.empty(numel)).add_(addend)
    got = codec.decode_add(enc, torch.empty(numel), addend)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("block_size", [65536, 1000, None])
def test_uint8_numpy_decode_is_bit_for_bit_the_torch_one(
    numel: int, block_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = get_codec("uint8", block_size=block_size)
    gen = torch.Generator().manual_seed(11)
    enc = codec.encode(torch.randn(numel, generator=gen) * 3 + 1)
    enc = Encoded.from_bytes(enc.to_bytes())  # parts viewing read-only bytes, as received
    addend = torch.randn(numel, generator=gen)
    fast = codec.decode(enc, out=torch.empty(numel))
    fast_add = codec.decode_add(enc, torch.empty(numel), addend)
    monkeypatch.setattr(uint8_module, "_NUMPY", False)
    assert torch.equal(fast, codec.decode(enc, out=torch.empty(numel)))
    assert torch.equal(fast_add, codec.decode_add(enc, torch.empty(numel), addend))


def test_uint8_numpy_encode_refuses_nan_and_inf() -> None:
    codec = get_codec("uint8")
    for bad in (float("nan"), float("inf")):
        x = torch.randn(3 * 65536 + 5)
        x[70000] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            codec.encode(x)


def test_decode_add_refuses_what_it_cannot_fuse() -> None:
    codec = get_codec("uint8")
    enc = codec.encode(torch.randn(100))
    with pytest.raises(ValueError, match="contiguous fp32 addend"):
        codec.decode_add(enc, torch.empty(100), torch.randn(100).half())
    with pytest.raises(ValueError, match="addend has 99 elements"):
        codec.decode_add(enc, torch.empty(100), torch.randn(99))


def test_uint8_encodes_in_threads_side_by_side_like_one_at_a_time() -> None:
    """The scratch buffers are shared between threads: concurrent encodes must not mix them."""
    codec = get_codec("uint8")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(3 * (1 << 17) + 999, generator=gen) * (i + 1) for i in range(8)]
    serial = [codec.encode(x).parts["codes"].clone() for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda x: codec.encode(x).parts["codes"], xs))
            assert all(torch.equal(a, b) for a, b in zip(got, serial, strict=True))
