"""The DiLoCo wrapper: exactness, hand-computed trajectories per outer loop, failures, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from lowcomm.comm.errors import CommTimeoutError
from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.errors import LowcommError
from lowcomm.faults import FaultInjector
from lowcomm.testing.groups import LocalGroup, SoloCommunicator

from ._toy import FailingComm, run_threads, toy_step, toy_trainer

FP32 = {"quantization": "none"}
# The one-step-delayed methods apply each average a tenth of a round late by default; these pin
# the full-round delay (H=2: apply_after_steps=2 is the end of the round) that the hand-computed
# trajectories follow.
FULL_ROUND = {"quantization": "none", "apply_after_steps": 2}


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)


def test_one_peer_one_inner_step_outer_lr_1_no_momentum_is_plain_adamw() -> None:
    ref = _mlp(0)
    model = copy.deepcopy(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    config = OuterConfig(sync_every=1, outer_lr=1.0, outer_momentum=0.0, **FP32)
    trainer = DiLoCo(model, opt, SoloCommunicator(), config=config)
    gen = torch.Generator().manual_seed(0)
    start = [p.detach().clone() for p in ref.parameters()]
    for _ in range(20):
        x, y = _batch(gen)
        for m in (ref, model):
            torch.nn.functional.mse_loss(m(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        trainer.step()
    assert trainer.stats.outer_steps == 20
    moved = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), start, strict=True))
    assert moved > 1e-2
    # theta - (theta - x) may differ from x by one ulp; nothing more.
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["diloco", "async", "co2", "streaming"])
def test_n_identical_peers_reproduce_one_peer(method: str) -> None:
    # Eager updates weigh a peer's own fresh share by 1/M, so they depend on M by design; the
    # one-step-delayed pipeline itself is tested without them.
    config = OuterConfig(method=method, sync_every=4, num_fragments=2, eager=False, **FP32)  # type: ignore[arg-type]

    def train(comm: object, model: torch.nn.Module) -> list[torch.Tensor]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        trainer = DiLoCo(model, opt, comm, config=config)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(1)
        for _ in range(17):
            x, y = _batch(gen)
            torch.nn.functional.mse_loss(model(x), y).backward()
            trainer.step()
        trainer.finish()
        return [p.detach().clone() for p in model.parameters()]

    solo = train(SoloCommunicator(), _mlp(0))
    group = LocalGroup(4)
    results: list[list[torch.Tensor]] = [[] for _ in range(4)]
    models = [_mlp(0) for _ in range(4)]  # seeded here: torch's global RNG is not per thread

    def peer(rank: int) -> None:
        results[rank] = train(group.communicator(rank), models[rank])

    run_threads([lambda r=r: peer(r) for r in range(4)])  # type: ignore[misc]
    for res in results:
        for a, b in zip(solo, res, strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(solo[0], _mlp(0)[0].weight.detach())


def _toy_thetas(
    config: OuterConfig, *, rounds: int, grad: float = 2.0, num: int = 1
) -> list[float]:
    model, trainer = toy_trainer(SoloCommunicator(), config, num=num)
    thetas = []
    for _ in range(rounds):
        for _ in range(config.sync_every):
            toy_step(model, trainer, grad)
        thetas.append(trainer.outer_params[0].item())
    return thetas


def test_diloco_toy_trajectory_matches_hand_computed_values() -> None:
    # Inner SGD lr 1, gradient 2, H=2: every round's pseudo-gradient is 4.
    # b=4, theta=-0.5*(4+2)=-3; b=6, theta=-3-0.5*(4+3)=-6.5; b=7, theta=-6.5-0.5*(4+3.5)=-10.25
    config = OuterConfig(sync_every=2, outer_lr=0.5, outer_momentum=0.5, **FP32)
    assert _toy_thetas(config, rounds=3) == [-3.0, -6.5, -10.25]


def test_async_diloco_applies_each_round_one_round_late() -> None:
    config = OuterConfig(
        method="async", eager=False, sync_every=2, outer_lr=0.5, outer_momentum=0.5, **FULL_ROUND
    )
    model, trainer = toy_trainer(SoloCommunicator(), config)
    thetas, locals_ = [], []
    for _ in range(3):
        for _ in range(2):
            toy_step(model, trainer, 2.0)
        thetas.append(trainer.outer_params[0].item())
        locals_.append(model.ps[0].item())
    assert thetas == [0.0, -3.0, -6.5]  # sync's values, one round late
    assert locals_ == [0.0, -3.0, -6.5]  # local progress rides in the in-flight pseudo-gradient
    trainer.finish()
    assert trainer.outer_params[0].item() == -10.25 == model.ps[0].item()


def test_async_early_application_shifts_local_params_and_loses_no_progress() -> None:
    # H=3, tau=1, outer lr 0.5, no momentum; each inner step moves the parameter by -2.
    config = OuterConfig(
        method="async",
        eager=False,
        apply_after_steps=1,
        sync_every=3,
        outer_lr=0.5,
        outer_momentum=0.0,
        **FP32,
    )
    model, trainer = toy_trainer(SoloCommunicator(), config)
    for _ in range(3):
        toy_step(model, trainer, 2.0)  # round 1: 0 -> -6, pseudo-gradient 6 in flight
    assert trainer.outer_params[0].item() == 0.0 and model.ps[0].item() == 0.0
    toy_step(model, trainer, 2.0)  # local -2; theta <- 0 - 0.5*6 = -3; local shifted by -3
    assert trainer.outer_params[0].item() == -3.0 and model.ps[0].item() == -5.0
    for _ in range(2):
        toy_step(model, trainer, 2.0)  # local -9; pseudo-gradient -3 - (-9) = 6, back to theta
    assert model.ps[0].item() == -3.0
    toy_step(model, trainer, 2.0)
    assert trainer.outer_params[0].item() == -6.0 and model.ps[0].item() == -8.0
    for _ in range(2):
        toy_step(model, trainer, 2.0)  # local -12; pseudo-gradient 6 in flight
    trainer.finish()
    assert trainer.stats.outer_steps == 3 and trainer.outer_params[0].item() == -9.0


def test_async_early_application_that_fails_carries_the_round_to_the_next() -> None:
    config = OuterConfig(
        method="async",
        eager=False,
        apply_after_steps=1,
        sync_every=3,
        outer_lr=0.5,
        outer_momentum=0.0,
        on_failure="drop",
        **FP32,
    )
    comm = FailingComm(SoloCommunicator(), fail={0})
    model, trainer = toy_trainer(comm, config)
    for _ in range(4):
        toy_step(model, trainer, 2.0)  # the early application of round 1 fails: no shift
    assert comm.fired == 1 and trainer.stats.dropped_rounds == 1
    assert trainer.outer_params[0].item() == 0.0 and model.ps[0].item() == -2.0
    for _ in range(2):
        toy_step(model, trainer, 2.0)  # pseudo-gradient 6 + the carried 6
    toy_step(model, trainer, 2.0)  # theta <- 0 - 0.5*12 = -6; local -2 shifted to -8
    assert trainer.outer_params[0].item() == -6.0 and model.ps[0].item() == -8.0
    for _ in range(2):
        toy_step(model, trainer, 2.0)
    trainer.finish()
    assert trainer.outer_params[0].item() == -9.0  # 3 rounds x 6 x 0.5: nothing lost


def test_async_early_application_keeps_peers_outer_params_bit_identical() -> None:
    config = OuterConfig(method="async", apply_after_steps=1, sync_every=3)  # eager, uint8
    group = LocalGroup(3)
    models = [_mlp(0) for _ in range(3)]
    trainers: list[DiLoCo] = []

    def peer(rank: int) -> None:
        model = models[rank]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        trainer = DiLoCo(model, opt, group.communicator(rank), config=config)
        trainers.append(trainer)
        gen = torch.Generator().manual_seed(rank)  # different data on every peer
        for _ in range(11):
            x, y = _batch(gen)
            torch.nn.functional.mse_loss(model(x), y).backward()
            trainer.step()
        trainer.finish()

    run_threads([lambda r=r: peer(r) for r in range(3)])  # type: ignore[misc]
    assert [t.stats.outer_steps for t in trainers] == [3, 3, 3]
    assert len({t.outer_hash() for t in trainers}) == 1
    for model in models[1:]:
        for a, b in zip(models[0].parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b)  # finish() loads theta everywhere


def test_eager_updates_with_one_peer_track_synchronous_diloco() -> None:
    sync = OuterConfig(sync_every=2, outer_lr=0.5, outer_momentum=0.5, **FP32)
    eager = OuterConfig(
        method="async", eager=True, sync_every=2, outer_lr=0.5, outer_momentum=0.5, **FULL_ROUND
    )
    model, trainer = toy_trainer(SoloCommunicator(), eager)
    starts = []
    for _ in range(3):
        for _ in range(2):
            toy_step(model, trainer, 2.0)
        starts.append(model.ps[0].item())
    # With one peer the fresh contribution replaces the whole stale average: no staleness left.
    assert starts == pytest.approx(_toy_thetas(sync, rounds=3), abs=1e-6)


def test_eager_updates_with_two_peers_match_hand_computed_values() -> None:
    # H=1, outer lr 1, no momentum; peer 0 moves 2 per round, peer 1 moves 4 (average 3).
    config = OuterConfig(
        method="async", eager=True, sync_every=1, outer_lr=1.0, outer_momentum=0.0, **FP32
    )
    group = LocalGroup(2)
    starts: list[list[float]] = [[], []]

    def peer(rank: int) -> None:
        model, trainer = toy_trainer(group.communicator(rank), config)
        for _ in range(3):
            toy_step(model, trainer, 2.0 * (rank + 1))
            starts[rank].append(model.ps[0].item())

    run_threads([lambda: peer(0), lambda: peer(1)])
    # peer 0: -(2/2) = -1, then theta=-3 plus own offset -1 = -4, then theta=-6: -7
    assert starts == [[-1.0, -4.0, -7.0], [-2.0, -5.0, -8.0]]


def test_streaming_diloco_toy_trajectory_matches_hand_computed_values() -> None:
    # Two scalar fragments, H=4 (one fragment every 2 steps), overlap 1, merge 0.5, lr 1, mu 0.
    config = OuterConfig(
        method="streaming",
        sync_every=4,
        num_fragments=2,
        overlap_steps=1,
        merge_alpha=0.5,
        outer_lr=1.0,
        outer_momentum=0.0,
        **FP32,
    )
    model, trainer = toy_trainer(SoloCommunicator(), config, num=2)
    seen = []
    for _ in range(6):
        toy_step(model, trainer, 1.0)
        seen.append(
            (trainer.outer_params.tolist(), [p.item() for p in model.ps])  # type: ignore[misc]
        )
    # t=1 sends a (delta 1); t=2 theta_a=-1, local a=-2 -> merged -1.5
    assert seen[1] == ([-1.0, 0.0], [-1.5, -2.0])
    # t=3 sends b (delta 3); t=4 theta_b=-3, local b=-4 -> merged -3.5
    assert seen[3] == ([-1.0, -3.0], [-3.5, -3.5])
    # t=5 sends a (delta -1-(-4.5)=3.5); t=6 theta_a=-4.5, local a=-5.5 -> merged -5
    assert seen[5] == ([-4.5, -3.0], [-5.0, -5.5])


def test_co2_toy_trajectory_matches_hand_computed_values() -> None:
    # One-round-stale heavy ball: m = clip(0.5 m + 4/2, 1.5), theta -= m.
    clipped = OuterConfig(
        method="co2",
        sync_every=2,
        outer_lr=1.0,
        outer_momentum=0.5,
        co2_gap_penalty=2.0,
        co2_clip=1.5,
        **FULL_ROUND,
    )
    assert _toy_thetas(clipped, rounds=4) == [0.0, -1.5, -3.0, -4.5]
    free = OuterConfig(
        method="co2",
        sync_every=2,
        outer_lr=1.0,
        outer_momentum=0.5,
        co2_gap_penalty=2.0,
        co2_clip=None,
        **FULL_ROUND,
    )
    assert _toy_thetas(free, rounds=4) == [0.0, -2.0, -5.0, -8.5]


def test_delayed_nesterov_toy_trajectory_matches_hand_computed_values() -> None:
    config = OuterConfig(
        method="delayed_nesterov",
        sync_every=2,
        outer_lr=0.5,
        outer_momentum=0.5,
        dn_period=2,
        **FULL_ROUND,
    )
    assert _toy_thetas(config, rounds=5) == [0.0, -1.0, -3.0, -4.0, -6.5]


def test_dynamic_local_steps_give_a_slow_peer_fewer_inner_steps() -> None:
    import time

    config = OuterConfig(
        method="delayed_nesterov",
        dynamic_local_steps=True,
        sync_every=8,
        min_local_steps=2,
        apply_after_steps=8,
        **FP32,
    )
    group = LocalGroup(2)
    steps: list[list[int]] = [[], []]

    def peer(rank: int) -> None:
        model, trainer = toy_trainer(group.communicator(rank), config)
        if rank == 1:
            inner_step = trainer.inner_optimizer.step

            def slow_step(*a: object, **k: object) -> None:
                time.sleep(0.05)  # an inner step far slower than peer 0's (>= 4x is enough)
                inner_step()

            trainer.inner_optimizer.step = slow_step  # type: ignore[method-assign]
        for _ in range(5):
            before = trainer.stats.inner_steps
            while True:  # one round: until the wrapper ran its outer step
                toy_step(model, trainer, 1.0)
                if trainer.round_steps == 0:
                    break
            steps[rank].append(trainer.stats.inner_steps - before)

    run_threads([lambda: peer(0), lambda: peer(1)])
    assert steps[0] == [8, 8, 8, 8, 8]
    # Speeds travel one round behind, so the slow peer shrinks from the third round on.
    assert steps[1][:2] == [8, 8] and steps[1][2:] == [2, 2, 2]


def test_failed_round_is_retried_and_counted() -> None:
    config = OuterConfig(sync_every=2, outer_lr=0.5, outer_momentum=0.5, **FP32)
    comm = FailingComm(SoloCommunicator(), fail={1})
    model, trainer = toy_trainer(comm, config)
    for _ in range(6):
        toy_step(model, trainer, 2.0)
    assert comm.fired == 1
    assert trainer.stats.retried_rounds == 1 and trainer.stats.dropped_rounds == 0
    assert trainer.outer_params[0].item() == -10.25  # as if nothing had failed


def test_dropped_round_keeps_local_progress_for_the_next_round() -> None:
    config = OuterConfig(sync_every=2, outer_lr=0.5, outer_momentum=0.5, on_failure="drop", **FP32)
    comm = FailingComm(SoloCommunicator(), fail={1})
    model, trainer = toy_trainer(comm, config)
    thetas = []
    for _ in range(3):
        for _ in range(2):
            toy_step(model, trainer, 2.0)
        thetas.append(trainer.outer_params[0].item())
    assert comm.fired == 1 and trainer.stats.dropped_rounds == 1
    # Round 2 dropped (theta stays -3, local runs on to -7); round 3's pseudo-gradient is 8:
    # b = 0.5*4 + 8 = 10, theta = -3 - 0.5*(8 + 5) = -9.5.
    assert thetas == [-3.0, -3.0, -9.5]


def test_async_dropped_round_rides_with_the_next_pseudogradient() -> None:
    config = OuterConfig(
        method="async",
        sync_every=2,
        outer_lr=1.0,
        outer_momentum=0.0,
        on_failure="drop",
        **FULL_ROUND,
    )
    comm = FailingComm(SoloCommunicator(), fail={0})
    model, trainer = toy_trainer(comm, config)
    for _ in range(3):
        for _ in range(2):
            toy_step(model, trainer, 2.0)
    trainer.finish()
    assert comm.fired == 1 and trainer.stats.dropped_rounds == 1
    # No progress lost: 3 rounds x 4, applied with lr 1.
    assert trainer.outer_params[0].item() == -12.0


def test_state_dict_round_trip_resumes_the_exact_trajectory() -> None:
    config = OuterConfig(method="async", sync_every=3, **FP32)

    def make() -> tuple[torch.nn.Module, DiLoCo]:
        model = _mlp(0)
        return model, DiLoCo(
            model, torch.optim.AdamW(model.parameters(), lr=1e-2), SoloCommunicator(), config=config
        )

    def train(model: torch.nn.Module, trainer: DiLoCo, gen: torch.Generator, n: int) -> None:
        for _ in range(n):
            x, y = _batch(gen)
            torch.nn.functional.mse_loss(model(x), y).backward()
            trainer.step()

    model, trainer = make()
    gen = torch.Generator().manual_seed(5)
    train(model, trainer, gen, 9)  # ends on an outer step: nothing of the pipeline is lost
    state = copy.deepcopy(trainer.state_dict())
    params = copy.deepcopy(model.state_dict())
    rng = gen.get_state()
    train(model, trainer, gen, 7)
    trainer.finish()

    model2, trainer2 = make()
    model2.load_state_dict(params)
    trainer2.load_state_dict(state)
    gen2 = torch.Generator()
    gen2.set_state(rng)
    train(model2, trainer2, gen2, 7)
    trainer2.finish()
    assert torch.equal(trainer.outer_params, trainer2.outer_params)
    assert trainer.outer_hash() == trainer2.outer_hash()


def test_load_state_dict_rejects_a_different_config() -> None:
    _, a = toy_trainer(SoloCommunicator(), OuterConfig(sync_every=2))
    _, b = toy_trainer(SoloCommunicator(), OuterConfig(sync_every=3))
    with pytest.raises(ValueError, match="OuterConfig differs"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "nope"}, "method"),
        ({"sync_every": 0}, "sync_every"),
        ({"outer_lr": 0.0}, "outer_lr"),
        ({"outer_momentum": 1.5}, "outer_momentum"),
        ({"quantization": "int3"}, "quantization"),
        ({"method": "streaming", "sync_every": 2, "num_fragments": 3}, "num_fragments"),
        (
            {"method": "streaming", "sync_every": 6, "num_fragments": 3, "overlap_steps": 2},
            "overlap",
        ),
        ({"eager": True}, "eager"),
        ({"apply_after_steps": 1}, "apply_after_steps"),
        ({"method": "async", "sync_every": 4, "apply_after_steps": 5}, "apply_after_steps"),
        ({"method": "co2", "sync_every": 4, "apply_after_steps": 0}, "apply_after_steps"),
        ({"co2_gap_penalty": 0.5}, "co2_gap_penalty"),
        ({"co2_clip": -1.0}, "co2_clip"),
        ({"dynamic_local_steps": True}, "dynamic_local_steps"),
        ({"on_failure": "panic"}, "on_failure"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OuterConfig(**kwargs)  # type: ignore[arg-type]


def test_wrapper_rejects_a_model_without_trainable_parameters() -> None:
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DiLoCo(
            model,
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1),
            SoloCommunicator(),
            config=OuterConfig(),
        )


class _Stop(Exception):
    """The error the fault injector raises at the armed inner step."""


@pytest.mark.parametrize(
    "config",
    [
        OuterConfig(method="diloco", sync_every=3, **FP32),
        OuterConfig(method="async", sync_every=3, **FP32),
        OuterConfig(method="streaming", sync_every=3, num_fragments=3, overlap_steps=0, **FP32),
    ],
    ids=["diloco", "async", "streaming"],
)
def test_inner_step_fault_fires_after_exactly_n_inner_steps(config: OuterConfig) -> None:
    faults = FaultInjector()
    faults.inject("trainer.inner_step", error=_Stop("inner step 5"), where={"step": 5})
    model, trainer = toy_trainer(SoloCommunicator(), config, num=3, faults=faults)
    with pytest.raises(_Stop):
        for _ in range(10):
            toy_step(model, trainer, 1.0)
    assert faults.fired("trainer.inner_step") == 1
    assert faults.hits("trainer.inner_step") == 6  # steps 0..5; step 5 never ran
    assert trainer.stats.inner_steps == 5


def test_local_group_timeout_is_a_comm_timeout_error_the_trainer_catches() -> None:
    group = LocalGroup(2)
    handle = group.communicator(0).all_reduce_async(torch.zeros(3))  # peer 1 never joins
    with pytest.raises(CommTimeoutError, match="timed out") as info:
        handle.wait(timeout_s=0.05)
    assert isinstance(info.value, LowcommError) and isinstance(info.value, TimeoutError)


def test_in_process_groups_check_all_reduce_arguments_like_the_real_communicator() -> None:
    for comm in (SoloCommunicator(), LocalGroup(1).communicator(0)):
        with pytest.raises(ValueError, match="op must be one of"):
            comm.all_reduce_async(torch.zeros(2), "median")
        with pytest.raises(ValueError, match="float32"):
            comm.all_reduce_async(torch.zeros(2, dtype=torch.int64))
