"""The outer loops' defaults: valid for every method, and the unsafe combinations flagged.

The numbers behind the defaults are in docs/outer_loop_defaults.md (benchmarks/diloco.py part A).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from lowcomm.diloco import METHODS, DiLoCo, OuterConfig
from lowcomm.launch.experiments import LM_BETAS, LM_WEIGHT_DECAY, LMAdamW
from lowcomm.testing import SoloCommunicator


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_valid_default_config(method: str) -> None:
    config = OuterConfig(method=method)  # type: ignore[arg-type]
    assert config.outer_momentum is not None


def test_streaming_defaults_sync_each_fragment_within_sync_every() -> None:
    config = OuterConfig(method="streaming")
    assert config.sync_every % config.num_fragments != 0  # 50 and 3: allowed, rounded down
    spacing = config.sync_every // config.num_fragments
    assert 0 <= config.overlap_steps < spacing


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


def test_slow_inner_adam_with_outer_momentum_is_flagged() -> None:
    slow = torch.optim.AdamW(_params(), lr=1e-3)  # torch's default betas (0.9, 0.999)
    message = OuterConfig(outer_momentum=0.9).inner_optimizer_warning(slow)
    assert message is not None and "0.999" in message
    assert OuterConfig(outer_momentum=0.5).inner_optimizer_warning(slow) is None
    fast = LMAdamW(_params(), lr=1e-3)
    assert OuterConfig(outer_momentum=0.9).inner_optimizer_warning(fast) is None
    sgd = torch.optim.SGD(_params(), lr=1e-3)
    assert OuterConfig(outer_momentum=0.9).inner_optimizer_warning(sgd) is None


def test_the_wrapper_logs_the_slow_inner_optimizer_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="lowcomm.diloco.trainer"):
        DiLoCo(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-3),
            SoloCommunicator(),
            config=OuterConfig(outer_momentum=0.9),
        )
    assert any("overshoots" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowcomm.diloco.trainer"):
        DiLoCo(
            model,
            LMAdamW(model.parameters(), lr=1e-3),
            SoloCommunicator(),
            config=OuterConfig(outer_momentum=0.9),
        )
    assert not any("overshoots" in r.getMessage() for r in caplog.records)


def test_outer_momentum_on_a_late_applied_round_is_flagged() -> None:
    late = OuterConfig(method="async", sync_every=100, apply_after_steps=100)
    message = late.staleness_warning()
    assert message is not None and "100 of 100" in message and "outer_momentum=0" in message
    assert OuterConfig(method="async", sync_every=100, apply_after_steps=51).staleness_warning()
    # Half a round or less, momentum 0.5 or less, or a synchronous method: not flagged.
    assert (
        OuterConfig(method="async", sync_every=100, apply_after_steps=50).staleness_warning()
        is None
    )
    assert OuterConfig(method="async", sync_every=100).staleness_warning() is None
    full_no_momentum = OuterConfig(
        method="async", sync_every=100, apply_after_steps=100, outer_momentum=0.0
    )
    assert full_no_momentum.staleness_warning() is None
    assert OuterConfig(method="diloco", sync_every=100).staleness_warning() is None
    # A short full-round delay (at most MEASURED_SAFE_DELAY steps) is not flagged, and no
    # method's defaults are, at any H.
    assert (
        OuterConfig(method="async", sync_every=4, apply_after_steps=4).staleness_warning() is None
    )
    for method in ("async", "co2", "delayed_nesterov"):
        for h in (1, 2, 3, 5, 11, 50, 1000):
            assert OuterConfig(method=method, sync_every=h).staleness_warning() is None


def test_the_wrapper_logs_the_staleness_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Linear(2, 2)
    config = OuterConfig(method="async", sync_every=10, apply_after_steps=10)  # 10 > 5 steps
    with caplog.at_level(logging.WARNING, logger="lowcomm.diloco.trainer"):
        DiLoCo(model, LMAdamW(model.parameters(), lr=1e-3), SoloCommunicator(), config=config)
    assert any("applied 10 of 10" in r.getMessage() for r in caplog.records)


def _step_sizes(opt: LMAdamW, p: torch.nn.Parameter, n: int) -> list[float]:
    """How far each of n steps on a constant gradient moves p (Adam's step is about lr there)."""
    sizes = []
    for _ in range(n):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        sizes.append(float((before - p.detach())[0]))
    return sizes


def test_lm_adamw_settings_and_linear_warmup() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    assert LMAdamW([p], lr=1e-2).param_groups[0]["betas"] == LM_BETAS
    assert LMAdamW([p], lr=1e-2).param_groups[0]["weight_decay"] == LM_WEIGHT_DECAY
    opt = LMAdamW([p], lr=1e-2, weight_decay=0.0, warmup_steps=4)
    sizes = _step_sizes(opt, p, 6)
    assert sizes == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2], rel=1e-4)
    assert opt.param_groups[0]["lr"] == 1e-2  # the peak stays what a schedule would set


def test_lm_adamw_warmup_resumes_from_its_state_dict() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = LMAdamW([p], lr=1e-2, weight_decay=0.0, warmup_steps=4)
    _step_sizes(opt, p, 2)
    q = torch.nn.Parameter(p.detach().clone())
    resumed = LMAdamW([q], lr=1e-2, weight_decay=0.0, warmup_steps=4)
    resumed.load_state_dict(opt.state_dict())
    assert _step_sizes(resumed, q, 1) == pytest.approx([7.5e-3], rel=1e-4)  # step 3 of 4


def test_lm_adamw_step_at_lr_zero_moves_nothing_and_is_not_counted() -> None:
    from lowcomm.trainer.trainer import prime_optimizer

    p = torch.nn.Parameter(torch.ones(4))
    opt = LMAdamW([p], lr=1e-2, warmup_steps=4)
    prime_optimizer(opt)  # what a restore does before loading a checkpoint into it
    assert torch.equal(p.detach(), torch.ones(4))
    assert opt.param_groups[0]["num_steps"] == 0 and opt.param_groups[0]["lr"] == 1e-2


def test_lm_adamw_without_warmup_is_torch_adamw() -> None:
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    ours = LMAdamW([a], lr=1e-2)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=LM_BETAS, weight_decay=LM_WEIGHT_DECAY)
    for i in range(3):
        a.grad = torch.full((4,), float(i + 1))
        b.grad = torch.full((4,), float(i + 1))
        ours.step()
        ref.step()
    assert torch.equal(a, b)


def test_lm_adamw_rejects_a_negative_warmup() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        LMAdamW(_params(), lr=1e-3, warmup_steps=-1)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_takes_its_measured_outer_defaults_unless_set(method: str) -> None:
    from lowcomm.diloco.config import DEFAULT_OUTER

    config = OuterConfig(method=method)  # type: ignore[arg-type]
    assert (config.outer_lr, config.outer_momentum) == DEFAULT_OUTER[method]
    set_ = OuterConfig(method=method, outer_lr=0.5, outer_momentum=0.25)  # type: ignore[arg-type]
    assert (set_.outer_lr, set_.outer_momentum) == (0.5, 0.25)


@pytest.mark.parametrize("method", ["async", "co2", "delayed_nesterov"])
def test_the_one_step_delayed_methods_default_to_eager_updates(method: str) -> None:
    assert OuterConfig(method=method).eager is True  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eager"):
        OuterConfig(method="streaming", eager=True)


def _two_peer_run(config: OuterConfig) -> list[torch.Tensor]:
    """Two peers of a small regression model over a LocalGroup; peer 0's outer parameters."""
    from lowcomm.testing.groups import LocalGroup

    from ._toy import run_threads

    group = LocalGroup(2)
    out: list[list[torch.Tensor]] = [[], []]

    models = []
    for _ in range(2):  # seeded here, not in the threads: the global RNG is shared
        torch.manual_seed(0)
        models.append(torch.nn.Linear(4, 1))

    def peer(rank: int) -> None:
        model = models[rank]
        trainer = DiLoCo(
            model, LMAdamW(model.parameters(), lr=1e-2), group.communicator(rank), config=config
        )
        gen = torch.Generator().manual_seed(10 + rank)
        for _ in range(13):
            x = torch.randn(8, 4, generator=gen)
            torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            trainer.step()
        trainer.finish()
        out[rank] = [trainer.outer_params.clone()]

    run_threads([lambda: peer(0), lambda: peer(1)])
    return out[0]


def test_co2_at_its_defaults_is_async_without_momentum_while_the_clip_does_not_bind() -> None:
    # CO2's defaults (momentum 0, gap penalty 1, clip 1.0 on values far below 1) make its rule
    # async's without momentum (Nesterov with momentum 0); both eager, both applied early.
    # docs/outer_loop_defaults.md measures that async.
    co2 = _two_peer_run(OuterConfig(method="co2", sync_every=3, quantization="none"))
    asy = _two_peer_run(
        OuterConfig(method="async", sync_every=3, quantization="none", outer_momentum=0.0)
    )
    naive = _two_peer_run(OuterConfig(method="co2", sync_every=3, quantization="none", eager=False))
    assert torch.equal(co2[0], asy[0])
    assert not torch.equal(co2[0], naive[0])


def test_delayed_nesterov_with_period_1_is_async_with_the_same_outer_step() -> None:
    kw: dict[str, Any] = dict(sync_every=3, quantization="none", outer_lr=0.7, outer_momentum=0.5)
    dn = _two_peer_run(OuterConfig(method="delayed_nesterov", **kw))
    asy = _two_peer_run(OuterConfig(method="async", **kw))
    assert torch.equal(dn[0], asy[0])


@pytest.mark.parametrize("method", ["async", "co2", "delayed_nesterov"])
def test_the_one_step_delayed_methods_apply_a_tenth_of_a_round_late_by_default(method: str) -> None:
    # docs/outer_loop_defaults.md: a full round of delay lost to one worker; 5 steps at H=50 won.
    assert OuterConfig(method=method).apply_after_steps == 5  # type: ignore[arg-type]
    assert OuterConfig(method=method, sync_every=20).apply_after_steps == 2  # type: ignore[arg-type]
    assert OuterConfig(method=method, sync_every=3).apply_after_steps == 1  # type: ignore[arg-type]
    full = OuterConfig(method=method, apply_after_steps=50)  # type: ignore[arg-type]
    assert full.apply_after_steps == full.sync_every
    for other in ("diloco", "streaming"):
        assert OuterConfig(method=other).apply_after_steps is None  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["co2", "delayed_nesterov"])
def test_the_early_apply_changes_co2_and_delayed_nesterov_runs(method: str) -> None:
    early = _two_peer_run(OuterConfig(method=method, sync_every=3, quantization="none"))  # type: ignore[arg-type]
    full = _two_peer_run(
        OuterConfig(method=method, sync_every=3, apply_after_steps=3, quantization="none")  # type: ignore[arg-type]
    )
    assert not torch.equal(early[0], full[0])


def test_delayed_nesterov_at_its_defaults_is_async_at_its_defaults() -> None:
    # docs/outer_loop_defaults.md measures async's defaults (lr 0.7, momentum 0.9, applied early).
    dn = _two_peer_run(OuterConfig(method="delayed_nesterov", sync_every=3, quantization="none"))
    asy = _two_peer_run(OuterConfig(method="async", sync_every=3, quantization="none"))
    assert torch.equal(dn[0], asy[0])
