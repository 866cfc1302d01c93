"""The single-process pipeline simulator: reproducible, failures that destroy, rules applied."""

from __future__ import annotations

import torch

from lowcomm.recovery import Rule
from lowcomm.recovery.simulator import (
    FailureSchedule,
    SimConfig,
    SimPipeline,
    SimResult,
    simulate,
    standard_methods,
)
from lowcomm.recovery.stages import StageConfig

STAGES = StageConfig(num_block_stages=4, width=16, num_heads=2, context=16)
CONFIG = SimConfig(
    stages=STAGES, num_steps=12, batch_size=4, num_micro_batches=2, lr=3e-3, eval_every=4
)
DATA = torch.randint(
    0, 256, (4000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64
).to(torch.uint8)
TRAIN, VAL = DATA[:3000], DATA[3000:]
METHODS = standard_methods(rollback_every=(5,))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.randint(
        0, 256, (4, STAGES.context + 1), generator=torch.Generator().manual_seed(seed)
    )
    return window[:, :-1], window[:, 1:]


def test_two_runs_with_failures_give_identical_losses() -> None:
    schedule = FailureSchedule.scripted({3: [2], 7: [0, 4]})
    for name in ("gradavg", "checkfree_plus", "rollback_5", "random"):
        a = simulate(CONFIG, METHODS[name], train_data=TRAIN, val_data=VAL, schedule=schedule)
        b = simulate(CONFIG, METHODS[name], train_data=TRAIN, val_data=VAL, schedule=schedule)
        assert a.train_losses == b.train_losses and a.eval_losses == b.eval_losses, name
        assert a.reports and a.reports[0][1].stage == 2


def test_a_random_schedule_is_seeded_and_shared_by_every_method() -> None:
    a = FailureSchedule.random(num_steps=2000, stages=range(5), rate=3e-3, seed=4)
    b = FailureSchedule.random(num_steps=2000, stages=range(5), rate=3e-3, seed=4)
    assert a == b and 10 <= a.num_failures <= 60  # expected 2000 * 5 * 3e-3 = 30
    assert FailureSchedule.random(num_steps=50, stages=range(5), rate=0.0, seed=4).num_failures == 0
    assert a != FailureSchedule.random(num_steps=2000, stages=range(5), rate=3e-3, seed=5)


def test_a_middle_failure_destroys_the_stage_and_checkfree_rebuilds_it_from_its_neighbours() -> (
    None
):
    pipe = SimPipeline(CONFIG, METHODS["gradavg"])
    for step in range(3):
        pipe.train_step(step, *_batch(step))
    prev = {k: v.clone() for k, v in pipe.modules[1].state_dict().items()}
    nxt = {k: v.clone() for k, v in pipe.modules[3].state_dict().items()}
    before = {k: v.clone() for k, v in pipe.modules[2].state_dict().items()}
    n_prev, n_next = pipe.grad_norms[1], pipe.grad_norms[3]
    assert n_prev is not None and n_next is not None
    pipe.destroy(2)
    assert all(torch.isnan(p).all() for p in pipe.modules[2].parameters())
    assert pipe.grad_norms[2] is None and not pipe.optimizers[2].state
    result = SimResult(method="gradavg")
    pipe.recover(3, frozenset({2}), result)
    ((_, report),) = result.reports
    assert report.rule == Rule.CHECKFREE and report.sources == ("neighbour:1", "neighbour:3")
    w_prev, w_next = n_prev.before_clip + 1e-4, n_next.before_clip + 1e-4
    for name, p in pipe.modules[2].state_dict().items():
        assert torch.equal(p, (w_next * nxt[name] + w_prev * prev[name]) / (w_next + w_prev)), name
    assert any(not torch.equal(before[n], p) for n, p in pipe.modules[2].state_dict().items())
    assert not pipe.optimizers[2].state  # fresh Adam
    lr = pipe.optimizers[2].param_groups[0]
    pipe.train_step(3, *_batch(3))
    assert lr["lr"] > CONFIG.lr  # the boost is on
    assert pipe.optimizers[1].param_groups[0]["lr"] == CONFIG.lr


def test_adjacent_failures_restore_the_checkpoint_not_a_dead_neighbour() -> None:
    schedule = FailureSchedule.scripted({7: [2, 3]})
    result = simulate(CONFIG, METHODS["gradavg"], train_data=TRAIN, val_data=VAL, schedule=schedule)
    assert [(s, r.stage, r.rule) for s, r in result.reports] == [
        (7, 2, Rule.CHECKPOINT),
        (7, 3, Rule.CHECKPOINT),
    ]
    assert all(torch.isfinite(torch.tensor(result.train_losses)))


def test_without_checkfree_plus_the_embedding_falls_back_with_it_is_copied() -> None:
    schedule = FailureSchedule.scripted({6: [0], 9: [4]})
    plain = simulate(CONFIG, METHODS["gradavg"], train_data=TRAIN, val_data=VAL, schedule=schedule)
    plus = simulate(
        CONFIG, METHODS["checkfree_plus"], train_data=TRAIN, val_data=VAL, schedule=schedule
    )
    assert [r.rule for _, r in plain.reports] == [Rule.CHECKPOINT, Rule.CHECKPOINT]
    assert [(r.rule, r.sources) for _, r in plus.reports] == [
        (Rule.CHECKFREE_PLUS, ("backup:1",)),
        (Rule.CHECKFREE_PLUS, ("neighbour:3",)),
    ]


def test_rollback_really_loses_the_work_since_the_last_checkpoint() -> None:
    pipe = SimPipeline(CONFIG, METHODS["rollback_5"])
    for step in range(7):
        pipe.train_step(step, *_batch(step))
    saved = pipe.checkpoint
    assert saved.step == 5
    pipe.destroy(3)
    result = SimResult(method="rollback_5")
    pipe.recover(7, frozenset({3}), result)
    assert result.lost_steps == 2 and result.reports[0][1].rule == "rollback"
    for module, params in zip(pipe.modules, saved.params, strict=True):
        for name, p in module.state_dict().items():
            assert torch.equal(p, params[name])


def test_the_no_failure_run_ignores_the_schedule_and_swaps_change_training() -> None:
    schedule = FailureSchedule.scripted({2: [1]})
    base = simulate(
        CONFIG, METHODS["no_failure"], train_data=TRAIN, val_data=VAL, schedule=schedule
    )
    swaps = simulate(
        CONFIG, METHODS["no_failure_swaps"], train_data=TRAIN, val_data=VAL, schedule=schedule
    )
    assert not base.reports and not swaps.reports and base.lost_steps == 0
    assert base.train_losses[0] != swaps.train_losses[0]  # micro-batch 1 runs swapped
    assert len(base.eval_losses) == 3 and base.eval_steps == [4, 8, 12]
