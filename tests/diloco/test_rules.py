"""The pure outer-loop rules against hand-computed values and their defining identities."""

from __future__ import annotations

import pytest
import torch

from lowcomm.diloco import (
    co2_step,
    delayed_nesterov_step,
    dynamic_local_steps,
    eager_correction,
    nesterov_step,
    streaming_merge,
)


def test_nesterov_step_matches_torch_sgd_with_nesterov() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(100, generator=gen)
    ref = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    mom = torch.zeros(100)
    for _ in range(5):
        delta = torch.randn(100, generator=gen)
        nesterov_step(theta, mom, delta, lr=0.7, mu=0.9)
        ref.grad = delta.clone()
        sgd.step()
    torch.testing.assert_close(theta, ref.detach(), rtol=0, atol=1e-6)


def test_nesterov_step_by_hand() -> None:
    theta, mom = torch.zeros(1), torch.zeros(1)
    for expected in (-3.0, -6.5, -10.25):
        nesterov_step(theta, mom, torch.full((1,), 4.0), lr=0.5, mu=0.5)
        assert theta.item() == expected


def test_co2_clipping_really_bounds_the_momentum() -> None:
    gen = torch.Generator().manual_seed(1)
    theta, mom = torch.zeros(1000), torch.zeros(1000)
    unclipped = torch.zeros(1000)
    for _ in range(10):
        delta = 100 * torch.randn(1000, generator=gen)
        co2_step(theta, mom, delta, lr=1.0, beta=0.9, gap_penalty=2.0, clip=0.5)
        unclipped.mul_(0.9).add_(delta / 2)
        assert mom.abs().max().item() <= 0.5
    # The bound was active (the released CO2 code's clamp result is thrown away: not here).
    assert unclipped.abs().max().item() > 10
    assert (mom.abs() == 0.5).float().mean().item() > 0.9


def test_co2_step_by_hand_with_gap_penalty_and_clip() -> None:
    theta, mom = torch.zeros(1), torch.zeros(1)
    co2_step(theta, mom, torch.full((1,), 4.0), lr=1.0, beta=0.5, gap_penalty=2.0, clip=1.5)
    assert (theta.item(), mom.item()) == (-1.5, 1.5)
    co2_step(theta, mom, torch.full((1,), 4.0), lr=1.0, beta=0.5, gap_penalty=2.0, clip=None)
    assert (theta.item(), mom.item()) == (-4.25, 2.75)


def test_delayed_nesterov_over_n_pushes_is_one_nesterov_step_on_their_mean() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 4
    theta0, mom0 = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    pushes = [torch.randn(50, generator=gen) for _ in range(n)]
    theta, mom, buf = theta0.clone(), mom0.clone(), torch.zeros(50)
    count = 0
    for g in pushes:
        count = delayed_nesterov_step(theta, mom, buf, g, count=count, period=n, lr=0.3, mu=0.9)
    ref_theta, ref_mom = theta0.clone(), mom0.clone()
    nesterov_step(ref_theta, ref_mom, torch.stack(pushes).mean(0), lr=0.3, mu=0.9)
    assert count == n
    torch.testing.assert_close(theta, ref_theta, rtol=0, atol=1e-5)
    torch.testing.assert_close(mom, ref_mom, rtol=0, atol=1e-6)
    assert buf.abs().max().item() == 0


def test_delayed_nesterov_by_hand() -> None:
    theta, mom, buf = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    count = 0
    trajectory = []
    for _ in range(4):
        count = delayed_nesterov_step(
            theta, mom, buf, torch.full((1,), 4.0), count=count, period=2, lr=0.5, mu=0.5
        )
        trajectory.append(theta.item())
    assert trajectory == [-1.0, -3.0, -4.0, -6.5]


def test_eager_correction_is_the_difference_of_the_two_nesterov_steps() -> None:
    gen = torch.Generator().manual_seed(3)
    theta, mom = torch.randn(20, generator=gen), torch.randn(20, generator=gen)
    avg, fresh, stale = (torch.randn(20, generator=gen) for _ in range(3))
    m = 4
    eager_theta, eager_mom = theta.clone(), mom.clone()
    nesterov_step(eager_theta, eager_mom, avg + (fresh - stale) / m, lr=0.7, mu=0.9)
    nesterov_step(theta, mom, avg, lr=0.7, mu=0.9)
    corr = eager_correction(fresh, stale, num_peers=m, lr=0.7, mu=0.9)
    torch.testing.assert_close(theta + corr, eager_theta, rtol=0, atol=1e-5)


def test_streaming_merge_mixes_local_and_global() -> None:
    local = torch.tensor([-2.0, 4.0])
    streaming_merge(local, torch.tensor([-1.0, 0.0]), alpha=0.5)
    assert local.tolist() == [-1.5, 2.0]
    streaming_merge(local, torch.tensor([7.0, 7.0]), alpha=0.0)
    assert local.tolist() == [7.0, 7.0]


def test_dynamic_local_steps_scales_by_speed_with_a_floor() -> None:
    assert dynamic_local_steps(100, own_speed=10.0, max_speed=10.0) == 100
    assert dynamic_local_steps(100, own_speed=2.5, max_speed=10.0) == 25
    assert dynamic_local_steps(100, own_speed=0.01, max_speed=10.0, min_steps=5) == 5
    with pytest.raises(ValueError, match="finite and positive"):
        dynamic_local_steps(100, own_speed=0.0, max_speed=1.0)
    with pytest.raises(ValueError, match="below"):
        dynamic_local_steps(100, own_speed=2.0, max_speed=1.0)
