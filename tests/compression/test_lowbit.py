"""fp8 and fp4 specifics: tie rounding, nibble order, grids, row vs block scales, CUDA-free fp8."""

from __future__ import annotations

import pytest
import torch

from lowcomm.compression import Encoded, get_codec
from tests.compression import _reference as ref


def test_fp8_grid_in_the_reference_is_the_e4m3fn_grid_torch_uses() -> None:
    # Independent check of the reference itself: all 127 non-negative finite e4m3fn values.
    torch_vals = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    assert torch.equal(ref.e4m3_values(), torch_vals)


def test_fp8_rounds_to_nearest_even_not_truncating() -> None:
    codec = get_codec("fp8")
    # Scaled by 448/448 = 1: 1.0625 is halfway between 1.0 and 1.125 (-> even, 1.0); 1.1875 is
    # halfway between 1.125 and 1.25 (-> even, 1.25); 1.1 is nearer 1.125 (truncation gives 1.0).
    x = torch.tensor([448.0, 1.0625, 1.1875, 1.1, -1.1, 2.0**-10, 3 * 2.0**-10])
    y = codec.decode(codec.encode(x))
    assert y.tolist() == [448.0, 1.0, 1.25, 1.125, -1.125, 0.0, 2.0**-8]


def test_fp8_row_wise_uses_one_scale_per_first_dim_row() -> None:
    x = torch.randn(10, 3, 4)
    x[3] *= 1000
    enc = get_codec("fp8").encode(x)
    assert enc.parts["scales"].shape == (10,)
    torch.testing.assert_close(
        enc.parts["scales"], x.reshape(10, -1).abs().amax(1) / 448, rtol=0, atol=0
    )
    # A huge row does not hurt the others' precision.
    y = get_codec("fp8").decode(enc)
    rows = ((y - x).reshape(10, -1).norm(dim=1) / x.reshape(10, -1).norm(dim=1)).tolist()
    assert max(rows) < 0.05


def test_fp8_block_mode_fits_one_dimensional_chunks() -> None:
    x = torch.randn(10_000)
    x[:100] *= 1e6  # pushes the rest of a shared scale into e4m3 subnormals
    rows = get_codec("fp8").decode(get_codec("fp8").encode(x))
    blocks = get_codec("fp8", block_size=256).decode(get_codec("fp8", block_size=256).encode(x))
    tail = slice(256, None)
    assert (blocks[tail] - x[tail]).norm() < 0.1 * (rows[tail] - x[tail]).norm()


@pytest.mark.parametrize("variant", ["e2m1", "e3m0"])
def test_fp4_decodes_only_to_scaled_grid_points_and_hits_each_one(variant: str) -> None:
    grid = ref.FP4[variant]
    top = grid[-1]
    x = torch.tensor([top, *grid, *(-g for g in grid)] * 3)[:32]
    y = get_codec("fp4", variant=variant).decode(get_codec("fp4", variant=variant).encode(x))
    assert torch.equal(y, x)


def test_fp4_ties_go_to_the_even_code() -> None:
    # Block absmax 6 -> scale 1. Midpoints: .25 -> 0, .75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    # 3.5 -> 4, 5 -> 4 (even codes 0, 2, 4, 6 are 0, 1, 2, 4).
    x = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0])
    y = get_codec("fp4").decode(get_codec("fp4").encode(x))
    assert y.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0]


def test_fp4_packs_two_codes_per_byte_low_nibble_first() -> None:
    x = torch.tensor([6.0, 0.5, -6.0])  # codes 7, 1, 15 (sign bit 8)
    enc = get_codec("fp4").encode(x)
    assert enc.parts["codes"].tolist() == [7 | (1 << 4), 15]
    assert enc.payload_nbytes == 2 + 4


@pytest.mark.parametrize("n", [1, 2, 31, 33, 1001])
def test_fp4_odd_and_non_multiple_of_block_sizes_round_trip_through_bytes(n: int) -> None:
    x = torch.randn(n)
    codec = get_codec("fp4", block_size=32)
    enc = Encoded.from_bytes(codec.encode(x).to_bytes())
    assert torch.equal(codec.decode(enc), ref.fp4(x, "e2m1", 32))


def test_fp4_rejects_unknown_variant() -> None:
    with pytest.raises(ValueError, match="variant"):
        get_codec("fp4", variant="e1m2")
