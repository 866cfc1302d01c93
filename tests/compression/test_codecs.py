"""Round-trip error, bit-exact agreement with the plain-torch references, and edge cases."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lowcomm.compression import Encoded, get_codec
from tests.compression import _reference as ref


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / x.float().norm()).item()


def fp16_ref(x: torch.Tensor) -> torch.Tensor:
    # numpy's float16 conversion is an independent round-to-nearest-even implementation.
    return torch.from_numpy(x.float().numpy().astype(np.float16).astype(np.float32))


# name, kwargs, reference (fp32 in -> fp32 out), per-element error bound (x -> bound tensor)
REFERENCES: dict[str, tuple[str, dict[str, object], Callable[[torch.Tensor], torch.Tensor]]] = {
    "fp16": ("fp16", {}, fp16_ref),
    "bf16": ("bf16", {}, ref.bf16_rne),
    "uint8-chunk": ("uint8", {"block_size": 1000}, lambda x: ref.uint8_minmax(x, 1000)),
    "uint8-tensor": (
        "uint8",
        {"block_size": None},
        lambda x: ref.uint8_minmax(x, max(x.numel(), 1)),
    ),
    "int8-64": ("int8", {"block_size": 64}, lambda x: ref.int8_absmax(x, 64)),
    "int8-100": ("int8", {"block_size": 100}, lambda x: ref.int8_absmax(x, 100)),
    "fp8-rows": (
        "fp8",
        {},
        lambda x: ref.fp8_e4m3(
            x,
            rows=x.shape[0] if x.dim() >= 2 and x.numel() else (1 if x.numel() else None),
            block=1,
        ),
    ),
    "fp8-block-48": ("fp8", {"block_size": 48}, lambda x: ref.fp8_e4m3(x, rows=None, block=48)),
    "fp4-e2m1-32": ("fp4", {"block_size": 32}, lambda x: ref.fp4(x, "e2m1", 32)),
    "fp4-e3m0-20": ("fp4", {"variant": "e3m0", "block_size": 20}, lambda x: ref.fp4(x, "e3m0", 20)),
}


def per_element_bound(key: str, x: torch.Tensor) -> torch.Tensor:
    """The bound each codec's docstring states, evaluated per element (plus fp32 slack)."""
    flat = x.reshape(-1).float()
    slack = 4 * torch.finfo(torch.float32).eps
    name, kwargs, _ = REFERENCES[key]
    if name == "fp16":
        return torch.maximum(flat.abs() * 2.0**-11, torch.tensor(2.0**-25))
    if name == "bf16":
        return flat.abs() * 2.0**-8
    block = kwargs.get("block_size") or (
        x.reshape(x.shape[0], -1).shape[1] if name == "fp8" else max(flat.numel(), 1)
    )
    assert isinstance(block, int)
    out = []
    for b in ref.blocks(flat, block):
        a = b.abs().max()
        if name == "uint8":
            out.append(((b.max() - b.min()) / 510 + slack * a).expand_as(b))
        elif name == "int8":
            out.append((a * (1 / 254 + slack)).expand_as(b))
        elif name == "fp8":
            out.append(torch.maximum(b.abs() / 16, a / 458752) * (1 + slack))
        elif kwargs.get("variant", "e2m1") == "e2m1":
            out.append(torch.maximum(a / 24, b.abs() / 4) * (1 + slack))
        else:
            out.append(torch.maximum(a / 128, b.abs() / 2) * (1 + slack))
    return torch.cat(out)


ALL = ["fp16", "bf16", "uint8", "int8", "fp8", "fp4"]

SHAPES = [(0,), (1,), (7,), (64,), (1000, 3), (3, 5, 67), ()]


@pytest.mark.parametrize("key", sorted(REFERENCES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_codec_matches_plain_torch_reference_bit_for_bit(key: str, shape: tuple[int, ...]) -> None:
    name, kwargs, reference = REFERENCES[key]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 3 + 0.5
    codec = get_codec(name, **kwargs)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    expected = reference(x).view(shape)
    assert torch.equal(y, expected), (
        f"{key}: max diff {(y - expected).abs().max() if y.numel() else 0}"
    )


@pytest.mark.parametrize("data", ["gauss", "student_t"])
@pytest.mark.parametrize("key", sorted(REFERENCES))
def test_codec_error_stays_within_documented_per_element_bound(
    key: str, data: str, gauss_2048: torch.Tensor, student_2048: torch.Tensor
) -> None:
    name, kwargs, _ = REFERENCES[key]
    x = (gauss_2048 if data == "gauss" else student_2048)[:64].contiguous()
    codec = get_codec(name, **kwargs)
    y = codec.decode(codec.encode(x))
    err = (y - x).reshape(-1).abs()
    bound = per_element_bound(key, x)
    assert bool((err <= bound).all()), f"{key}: worst excess {(err - bound).max().item()}"


# codec, kwargs, Gaussian target, Student-t target: relative L2 on 2048x2048
# (docs/algorithms.md section 6.2)
TARGETS = [
    ("fp16", {}, 0.0003, 0.0003),
    ("bf16", {}, 0.003, 0.003),
    ("int8", {"block_size": 64}, 0.006, 0.012),
    ("uint8", {}, 0.011, None),
    ("fp8", {}, 0.03, 0.03),
    ("fp4", {"block_size": 32}, 0.11, 0.12),
    ("fp4", {"variant": "e3m0", "block_size": 32}, 0.19, 0.16),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "gauss_target", "student_target"), TARGETS, ids=[t[0] for t in TARGETS]
)
def test_relative_error_on_2048_square_meets_the_anchor_targets(
    name: str,
    kwargs: dict[str, object],
    gauss_target: float,
    student_target: float | None,
    gauss_2048: torch.Tensor,
    student_2048: torch.Tensor,
) -> None:
    codec = get_codec(name, **kwargs)
    g = rel_err(gauss_2048, codec.decode(codec.encode(gauss_2048)))
    assert 0 < g <= gauss_target, g
    if student_target is not None:
        s = rel_err(student_2048, codec.decode(codec.encode(student_2048)))
        assert 0 < s <= student_target, s


@pytest.mark.parametrize("name", ["uint8", "int8"])
def test_rounding_is_unbiased_mean_error_near_zero(name: str, gauss_2048: torch.Tensor) -> None:
    codec = get_codec(name)
    x = gauss_2048 + 1.0  # an offset so a truncating quantizer would show a clear bias
    err = codec.decode(codec.encode(x)) - x
    # A truncating uint8 quantizer (PCCL) has bias -0.5 LSB ~ -0.02 sigma; ours must be ~0.
    lsb = 10.0 / 255
    assert abs(err.mean().item()) < 0.01 * lsb, err.mean().item()


def test_uint8_with_one_chunk_matches_pccl_scheme_without_truncation_bias() -> None:
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(3))
    codec = get_codec("uint8", block_size=None)
    enc = codec.encode(x)
    lo, hi = x.min(), x.max()
    expected_codes = torch.round((x - lo) * (255 / (hi - lo))).to(torch.uint8)
    truncated = ((x - lo) * (255 / (hi - lo))).to(torch.uint8)
    assert torch.equal(enc.parts["codes"], expected_codes)
    assert not torch.equal(enc.parts["codes"], truncated)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_fp32_input_round_trips_to_its_own_dtype(name: str, dtype: torch.dtype) -> None:
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(5)).to(dtype)
    codec = get_codec(name)
    y = codec.decode(codec.encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(x, y) < (0.15 if name == "fp4" else 0.03)
    # Decoding into an fp32 buffer gives the codec's fp32 result for the same (upcast) input.
    out = torch.empty(300 * 7)
    codec.decode(codec.encode(x), out=out)
    assert torch.equal(out, codec.decode(codec.encode(x.float())).view(-1))


@pytest.mark.parametrize("name", ALL)
def test_all_zero_tensors_round_trip_exactly_and_constants_within_an_ulp(name: str) -> None:
    codec = get_codec(name)
    for x in (
        torch.zeros(1000),
        torch.zeros(3, 0),
        torch.full((130,), -2.5),
        torch.full((64, 3), 1024.0),
    ):
        assert torch.equal(codec.decode(codec.encode(x)), x)
    for v in torch.randn(50, generator=torch.Generator().manual_seed(2)).tolist():
        x = torch.full((100,), v)
        y = codec.decode(codec.encode(x))
        if name == "uint8":
            assert torch.equal(y, x)  # decodes to the chunk minimum, exactly
        elif name in ("int8", "fp8", "fp4"):
            assert ((y - x).abs() <= 2 * torch.finfo(torch.float32).eps * abs(v)).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_input_raises_a_clear_error(name: str, bad: float) -> None:
    x = torch.randn(500)
    x[123] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        get_codec(name).encode(x)


def test_fp16_overflow_raises_instead_of_sending_inf() -> None:
    with pytest.raises(ValueError, match="overflows fp16"):
        get_codec("fp16").encode(torch.tensor([1.0, 70000.0]))


def test_values_that_would_round_to_inf_raise_but_the_largest_finite_ones_pass() -> None:
    assert (
        get_codec("fp16").decode(get_codec("fp16").encode(torch.tensor([65519.99]))).item() == 65504
    )
    with pytest.raises(ValueError, match="overflows bf16"):
        get_codec("bf16").encode(torch.tensor([-3.3962e38]))
    big = torch.tensor([3.3961e38])
    assert (
        get_codec("bf16").decode(get_codec("bf16").encode(big)).item()
        == torch.finfo(torch.bfloat16).max
    )


def test_uint8_range_overflowing_fp32_raises() -> None:
    with pytest.raises(ValueError, match="overflows"):
        get_codec("uint8").encode(torch.tensor([-3e38, 3e38]))


def test_tiny_blocks_flush_to_zero_instead_of_overflowing() -> None:
    x = torch.tensor([1e-38, -3e-39, 0.0, 2e-38])
    for name in ("int8", "uint8"):
        y = get_codec(name).decode(get_codec(name).encode(x))
        assert bool(torch.isfinite(y).all())
        assert (y - x).abs().max().item() < 2.0**-100


def test_decode_writes_into_out_and_returns_it() -> None:
    x = torch.randn(10_000)
    for name in ALL:
        codec = get_codec(name)
        enc = codec.encode(x)
        out = torch.full((10_000,), 99.0)
        assert codec.decode(enc, out=out) is out
        assert torch.equal(out, codec.decode(enc))
        # A non-contiguous or lower-precision destination goes through a temporary.
        wide = torch.zeros(10_000, 2)
        codec.decode(enc, out=wide[:, 0])
        assert torch.equal(wide[:, 0], out) and not wide[:, 1].any()
        half = torch.empty(100, 100, dtype=torch.bfloat16)
        codec.decode(enc, out=half)
        assert torch.equal(half.view(-1), out.to(torch.bfloat16))


def test_decode_rejects_out_of_the_wrong_size_or_dtype() -> None:
    codec = get_codec("int8")
    enc = codec.encode(torch.randn(100))
    with pytest.raises(ValueError, match="elements"):
        codec.decode(enc, out=torch.empty(99))
    with pytest.raises(ValueError, match="floating"):
        codec.decode(enc, out=torch.empty(100, dtype=torch.int32))


def test_decode_rejects_another_codecs_payload() -> None:
    enc = get_codec("int8").encode(torch.randn(10))
    with pytest.raises(ValueError, match="uint8 codec cannot decode a 'int8'"):
        get_codec("uint8").decode(enc)


def test_decode_uses_the_payloads_parameters_not_the_instances() -> None:
    x = torch.randn(1000)
    enc = get_codec("int8", block_size=100).encode(x)
    assert torch.equal(
        get_codec("int8", block_size=64).decode(enc), get_codec("int8", block_size=100).decode(enc)
    )


def test_encode_does_not_mutate_or_alias_its_input() -> None:
    x = torch.randn(1000)
    before = x.clone()
    for name in ALL:
        enc = get_codec(name).encode(x)
        assert torch.equal(x, before)
        for part in enc.parts.values():
            assert part.data_ptr() != x.data_ptr()
    h = torch.randn(100).half()
    enc = get_codec("fp16").encode(h)
    h.zero_()
    assert enc.parts["values"].abs().sum() > 0


def test_unknown_codec_and_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown codec 'int7'"):
        get_codec("int7")
    with pytest.raises(ValueError, match="block_size"):
        get_codec("int8", block_size=0)
    with pytest.raises(ValueError, match="zstd_level"):
        get_codec("int8", zstd_level=99)
    with pytest.raises(TypeError):
        get_codec("int8", bogus=1)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        get_codec("int8").encode(torch.arange(10))
    with pytest.raises(TypeError):
        get_codec("int8").encode([1.0, 2.0])  # type: ignore[arg-type]


def test_compressed_size_is_what_the_docstrings_say() -> None:
    x = torch.randn(4096 * 16)
    n = x.numel()
    sizes = {name: get_codec(name).encode(x).payload_nbytes for name in ALL}
    assert sizes == {
        "fp16": 2 * n,
        "bf16": 2 * n,
        "uint8": n + 8,
        "int8": n + 4 * n // 64,
        "fp8": n + 4,
        "fp4": n // 2 + 4 * n // 32,
    }
    enc = get_codec("int8").encode(x)
    assert enc.nbytes == len(enc.to_bytes())


def test_encoded_round_trip_through_bytes_is_bit_exact_for_every_codec() -> None:
    x = torch.randn(33, 65)
    for name in ALL:
        codec = get_codec(name)
        enc = codec.encode(x)
        back = Encoded.from_bytes(enc.to_bytes())
        assert torch.equal(codec.decode(back), codec.decode(enc))
        assert back.nbytes == enc.nbytes


@pytest.mark.parametrize("name", [*ALL, "topk"])
def test_non_contiguous_and_grad_tracking_inputs_encode_like_their_contiguous_copy(
    name: str,
) -> None:
    base = torch.randn(300, 200, requires_grad=True)
    x = base.t()  # non-contiguous view of a leaf that requires grad
    codec = get_codec(name)
    y = codec.decode(codec.encode(x))
    assert y.shape == (200, 300) and not y.requires_grad
    assert torch.equal(y, codec.decode(codec.encode(x.detach().contiguous())))
