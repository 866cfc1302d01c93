"""Top-k with packed indices, the bit packer, and error feedback making sums converge."""

from __future__ import annotations

import pytest
import torch

from lowcomm.compression import CodecError, Encoded, ErrorFeedback, get_codec
from lowcomm.compression._bits import pack_bits, unpack_bits
from tests.compression import _reference as ref


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8, 12, 16])
def test_bit_packing_round_trips_every_width(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


def test_bit_packing_is_little_endian() -> None:
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]
    assert pack_bits(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]


def topk_reference(x: torch.Tensor, chunk: int, k: int, value_bits: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    out = torch.zeros_like(flat)
    levels = 2 ** (value_bits - 1)
    for start in range(0, flat.numel(), chunk):
        c = flat[start : start + chunk]
        order = c.abs().argsort(descending=True)[: min(k, c.numel())]
        mag = c[order].abs()
        lo, hi = mag.min(), mag.max()
        if hi - lo > 2.0**-100:
            level = torch.round((mag - lo) * ref.exact_div(levels - 1, hi - lo))
            q = level * ref.exact_div(hi - lo, levels - 1) + lo
        else:
            q = torch.zeros_like(mag) + lo
        out[start + order] = torch.where(c[order] < 0, -q, q)
    return out.view(x.shape)


@pytest.mark.parametrize(
    ("chunk", "k", "bits"), [(4096, 64, 2), (100, 7, 4), (64, 64, 8), (33, 1, 2)]
)
@pytest.mark.parametrize("n", [0, 1, 50, 4096, 10_000])
def test_topk_matches_reference_bit_for_bit(chunk: int, k: int, bits: int, n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + k))
    codec = get_codec("topk", chunk_size=chunk, k=k, value_bits=bits)
    enc = Encoded.from_bytes(codec.encode(x).to_bytes())
    assert torch.equal(codec.decode(enc), topk_reference(x, chunk, k, bits))


def test_topk_keeps_k_per_chunk_and_costs_about_a_quarter_bit_per_element() -> None:
    x = torch.randn(256, 256 * 4)
    enc = get_codec("topk").encode(x)
    y = get_codec("topk").decode(enc)
    assert (y != 0).sum().item() == x.numel() // 4096 * 64
    assert 0.22 < enc.payload_nbytes * 8 / x.numel() < 0.25
    err = ((y - x).norm() / x.norm()).item()
    assert 0.85 < err < 0.99  # useless on its own: docs/algorithms.md section 6.2 measured 0.94


def test_topk_rejects_bad_parameters_and_non_finite_input() -> None:
    with pytest.raises(ValueError, match="k must"):
        get_codec("topk", chunk_size=16, k=17)
    with pytest.raises(ValueError, match="value_bits"):
        get_codec("topk", value_bits=3)
    with pytest.raises(ValueError, match="chunk_size"):
        get_codec("topk", chunk_size=1 << 17)
    x = torch.randn(5000)
    x[4500] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        get_codec("topk").encode(x)


def test_topk_fraction_sets_k_and_survives_serialisation() -> None:
    codec = get_codec("topk", chunk_size=1000, fraction=0.013)
    assert codec.k == 13
    x = torch.randn(2500)
    enc = Encoded.from_bytes(codec.encode(x).to_bytes())
    assert (codec.decode(enc) != 0).sum().item() == 13 * 3
    with pytest.raises(ValueError, match="fraction"):
        get_codec("topk", fraction=0.0)


def test_topk_payload_with_an_out_of_chunk_index_is_rejected() -> None:
    codec = get_codec("topk", chunk_size=100, k=3)
    enc = codec.encode(torch.randn(150))  # the tail chunk has 50 elements
    idx = enc.parts["indices"].clone()
    idx[-1] = 0xFF  # the last 7-bit index of the tail now reads >= 50
    bad = Encoded(
        codec="topk",
        params=enc.params,
        dtype=enc.dtype,
        shape=enc.shape,
        parts={**enc.parts, "indices": idx},
    )
    with pytest.raises(CodecError, match="index"):
        codec.decode(Encoded.from_bytes(bad.to_bytes()))


def run_rounds(
    codec_name: str, *, feedback: bool, rounds: int = 150, **kwargs: object
) -> tuple[float, float]:
    """Relative error of the running sum of decoded tensors vs the sum of inputs (first, last)."""
    g = torch.Generator().manual_seed(0)
    codec = get_codec(codec_name, **kwargs)
    ef = ErrorFeedback(codec)
    signal = torch.randn(64, 256, generator=g)  # a consistent direction, as pseudo-gradients have
    sent = torch.zeros(64, 256)
    true = torch.zeros(64, 256)
    errs = []
    for _ in range(rounds):
        x = signal + 0.5 * torch.randn(64, 256, generator=g)
        true += x
        sent += ef.decode(ef.encode("w", x)) if feedback else codec.decode(codec.encode(x))
        errs.append(((sent - true).norm() / true.norm()).item())
    return errs[0], errs[-1]


def test_topk_without_error_feedback_never_converges() -> None:
    first, last = run_rounds("topk", feedback=False, chunk_size=1024, k=32)
    assert first > 0.8 and last > 0.8


def test_topk_with_error_feedback_makes_the_sum_converge() -> None:
    first, last = run_rounds("topk", feedback=True, chunk_size=1024, k=32)
    assert first > 0.8
    assert last < 0.3 * first
    assert last < 0.15


def test_error_feedback_keeps_sum_of_decoded_plus_residual_equal_to_sum_of_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    ef = ErrorFeedback(get_codec("fp4"))
    sent = torch.zeros(1000, dtype=torch.float64)
    true = torch.zeros(1000, dtype=torch.float64)
    for _ in range(100):
        x = torch.randn(1000, generator=g)
        true += x.double()
        sent += ef.decode(ef.encode("p", x)).double()
    residual = ef.residual("p")
    assert residual is not None
    torch.testing.assert_close(sent + residual.double(), true, rtol=0, atol=1e-4)
    # The residual stays bounded (a fraction of one round), so the sum error does not grow.
    assert residual.norm() < 0.5 * torch.randn(1000, generator=g).norm()


def test_error_feedback_is_kept_per_name_across_differently_shaped_tensors() -> None:
    g = torch.Generator().manual_seed(2)
    ef = ErrorFeedback(get_codec("topk", chunk_size=64, k=4))
    shapes = {"a": (10, 20), "b": (333,), "c": (2, 3, 4)}
    sums = {n: torch.zeros(s) for n, s in shapes.items()}
    sent = {n: torch.zeros(s) for n, s in shapes.items()}
    for _ in range(40):
        for name, shape in shapes.items():
            x = torch.randn(shape, generator=g) + 1.0
            sums[name] += x
            y = ef.decode(ef.encode(name, x))
            assert y.shape == shape
            sent[name] += y
    for name in shapes:
        res = ef.residual(name)
        assert res is not None and res.shape == shapes[name]
        torch.testing.assert_close(sent[name] + res, sums[name], rtol=0, atol=1e-3)
    assert sorted(ef.names) == ["a", "b", "c"]


def test_error_feedback_rejects_a_shape_change_until_reset() -> None:
    ef = ErrorFeedback(get_codec("int8"))
    ef.encode("w", torch.randn(10))
    with pytest.raises(ValueError, match="reset"):
        ef.encode("w", torch.randn(11))
    ef.reset("w")
    ef.encode("w", torch.randn(11))
    ef.reset()
    assert ef.names == []


def test_error_feedback_leaves_the_residual_alone_when_encoding_fails() -> None:
    ef = ErrorFeedback(get_codec("int8"))
    ef.encode("w", torch.randn(100))
    before = ef.state_dict()["w"]
    bad = torch.randn(100)
    bad[5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        ef.encode("w", bad)
    assert torch.equal(ef.state_dict()["w"], before)


def test_error_feedback_returns_the_input_dtype_and_restores_from_state_dict() -> None:
    ef = ErrorFeedback(get_codec("uint8"), decay=0.95)
    x = torch.randn(50, dtype=torch.bfloat16)
    enc = ef.encode("w", x)
    assert ef.decode(enc).dtype == torch.bfloat16
    other = ErrorFeedback(get_codec("uint8"), decay=0.95)
    other.load_state_dict(ef.state_dict())
    x2 = torch.randn(50)
    assert torch.equal(ef.decode(ef.encode("w", x2)), other.decode(other.encode("w", x2)))
    with pytest.raises(ValueError, match="decay"):
        ErrorFeedback(get_codec("uint8"), decay=1.5)
