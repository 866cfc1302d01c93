"""CheckFree+'s out-of-order pipelining for any stage count."""

from __future__ import annotations

import pytest

from lowcomm.recovery import block_order, swap_partner, swaps_enabled


@pytest.mark.parametrize("n", range(4, 13))
def test_odd_micro_batches_swap_the_first_two_and_the_last_two_block_stages(n: int) -> None:
    plain = tuple(range(1, n + 1))
    assert block_order(0, n, swap=True) == plain
    assert block_order(2, n, swap=True) == plain
    swapped = block_order(1, n, swap=True)
    assert swapped == (2, 1, *range(3, n - 1), n, n - 1)
    assert sorted(swapped) == list(plain)
    assert block_order(1, n, swap=False) == plain
    for stage in (1, 2, n - 1, n):
        partner = swap_partner(stage, n)
        assert partner is not None and swap_partner(partner, n) == stage


@pytest.mark.parametrize("n", [1, 2, 3])
def test_below_four_block_stages_nothing_is_swapped(n: int) -> None:
    # The two swapped pairs would overlap (3) or coincide (2): CheckFree+ has no swap there, and
    # the edge stages fall back to the checkpoint.
    assert not swaps_enabled(n, checkfree_plus=True)
    assert all(swap_partner(s, n) is None for s in range(n + 1))
    assert block_order(1, n, swap=False) == tuple(range(1, n + 1))
    with pytest.raises(ValueError, match="need >= 4"):
        block_order(1, n, swap=True)
