"""``lowcomm.Trainer`` in one process: checkpoint, restore, and the rule that never rolls back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowcomm.checkpoint import CheckpointConfig
from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.testing import SoloCommunicator
from lowcomm.trainer import Trainer
from tests.trainer._data import Batches, make_model, train_step

OUTER = OuterConfig(method="diloco", sync_every=4, quantization="none")


def _trainer(root: Path, seed: int, data: Batches, **kw: object) -> tuple[torch.nn.Module, Trainer]:
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(
        model,
        opt,
        SoloCommunicator(),
        outer=OUTER,
        checkpoint=CheckpointConfig(levels=(str(root),)),
        checkpoint_every=5,
        stateful={"data": data},
        **kw,  # type: ignore[arg-type]
    )
    return model, trainer


def test_a_restarted_trainer_continues_bit_identically_from_its_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(123)
    ref_data = Batches(seed=1)
    ref_model, ref = _trainer(tmp_path / "ref", 0, ref_data)
    for _ in range(22):
        train_step(ref_model, ref_data, ref)
    ref.finish()

    torch.manual_seed(123)
    data = Batches(seed=1)
    model, first = _trainer(tmp_path / "run", 0, data)
    for _ in range(13):  # saves at 5 and 10; steps 11-13 are lost with the "crash"
        train_step(model, data, first)
    assert first.checkpointer is not None
    first.checkpointer.wait()
    torch.manual_seed(999)  # the restarted process's RNG differs until the restore
    data2 = Batches(seed=7)
    model2, second = _trainer(tmp_path / "run", 42, data2)  # another init: the restore must win
    assert second.resumed_from == 10 and second.inner_step == 10
    assert data2.position == 10 and data2.seed == 1
    assert second.outer_step == 2
    while second.inner_step < 22:
        train_step(model2, data2, second)
    second.finish()
    assert torch.equal(second.diloco.outer_params, ref.diloco.outer_params)
    for a, b in zip(model2.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_trainer_without_a_checkpoint_starts_at_zero(tmp_path: Path) -> None:
    data = Batches()
    _, trainer = _trainer(tmp_path, 0, data)
    assert trainer.resumed_from is None and trainer.inner_step == 0
    trainer.finish()


def test_load_state_dict_restores_the_model_and_the_optimizer_moments() -> None:
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dl = DiLoCo(model, opt, SoloCommunicator(), config=OUTER)
    data = Batches()
    for _ in range(6):
        train_step(model, data, dl)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    state = dl.state_dict()
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    for _ in range(3):
        train_step(model, data, dl)
    assert dl.load_state_dict(state) is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for p, m in zip(model.parameters(), moments, strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], m)


def test_a_saved_outer_state_is_never_loaded_over_a_newer_one_from_the_run() -> None:
    old_model = make_model(0)
    old_opt = torch.optim.AdamW(old_model.parameters(), lr=1e-2)
    old = DiLoCo(old_model, old_opt, SoloCommunicator(), config=OUTER)
    data = Batches()
    for _ in range(8):  # outer step 2
        train_step(old_model, data, old)
    saved = old.state_dict()
    moments = [old_opt.state[p]["exp_avg"].clone() for p in old_model.parameters()]

    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    newer = DiLoCo(model, opt, SoloCommunicator(), config=OUTER)
    for _ in range(21):  # outer step 5
        train_step(model, Batches(seed=3), newer)
    newer.sync_with_run(joining=False)  # as received from the live peers
    theta = newer.outer_params.clone()
    assert newer.stats.outer_steps == 5 and not torch.equal(
        theta[: saved["outer"]["theta"].numel()], saved["outer"]["theta"]
    )
    assert newer.load_state_dict(saved) is False
    assert newer.stats.outer_steps == 5
    assert torch.equal(newer.outer_params, theta)  # the run's state was kept
    assert newer.round_steps == 0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(flat, theta)  # the model restarts the round from the run's theta
    for p, m in zip(model.parameters(), moments, strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], m)  # but the moments are the checkpoint's


def test_bad_trainer_arguments_are_named() -> None:
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="checkpoint_every needs"):
        Trainer(model, opt, SoloCommunicator(), outer=OUTER, checkpoint_every=3)
    with pytest.raises(ValueError, match="run_or_comm"):
        Trainer(model, opt, object(), outer=OUTER)
    with pytest.raises(ValueError, match="stateful"):
        Trainer(model, opt, SoloCommunicator(), outer=OUTER, stateful={"d": object()})  # type: ignore[dict-item]


def test_checkpoint_every_outer_saves_in_the_step_that_applied_the_outer_step(
    tmp_path: Path,
) -> None:
    data = Batches()
    model = make_model(0)
    trainer = Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        SoloCommunicator(),
        outer=OUTER,  # an outer step every 4 inner steps
        checkpoint=CheckpointConfig(levels=(str(tmp_path),), keep_last_local=5),
        checkpoint_every_outer=2,
    )
    for _ in range(17):
        train_step(model, data, trainer)
    assert trainer.checkpointer is not None
    trainer.checkpointer.wait()
    infos = trainer.checkpointer.checkpoints()
    assert [i.step for i in infos] == [8, 16]  # outer steps 2 and 4
    restored = trainer.checkpointer.restore(step=8)
    assert restored["step"] == 8
    trainer.finish()


def test_finish_right_after_save_keeps_the_saved_values_not_the_applied_ones(
    tmp_path: Path,
) -> None:
    from lowcomm.faults import FaultInjector

    faults = FaultInjector()
    data = Batches()
    model, trainer = _trainer(tmp_path, 0, data, faults=faults)
    for _ in range(3):
        train_step(model, data, trainer)
    faults.inject("local.open", delay_s=0.3)  # the write starts after finish() changed the model
    trainer.save()  # inner step 3, mid-round: finish() then loads the outer parameters
    saved = [p.detach().clone() for p in model.parameters()]
    trainer.finish()
    assert any(not torch.equal(a, b) for a, b in zip(saved, model.parameters(), strict=True))
    model2, again = _trainer(tmp_path, 1, Batches())
    assert again.resumed_from == 3
    for a, b in zip(saved, model2.parameters(), strict=True):
        assert torch.equal(a, b)
    again.finish()
    assert faults.fired("local.open") == 1


def test_a_checkpoint_interval_shorter_than_the_copy_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lowcomm.faults import FaultInjector

    faults = FaultInjector()
    faults.inject("copy", delay_s=0.3, times=2)  # the copy outlasts the step after each save
    data = Batches()
    model = make_model(0)
    trainer = Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        SoloCommunicator(),
        outer=OUTER,
        checkpoint=CheckpointConfig(levels=("host://", str(tmp_path))),
        checkpoint_every=1,
        faults=faults,
    )
    with caplog.at_level("WARNING", logger="lowcomm.trainer.trainer"):
        for _ in range(4):
            train_step(model, data, trainer)
    trainer.finish()
    assert faults.fired("copy") == 2
    warnings = [r for r in caplog.records if "checkpoint interval too short" in r.getMessage()]
    assert len(warnings) == 1
    assert "checkpoint_every (now 1)" in warnings[0].getMessage()


def test_a_checkpoint_in_the_old_volunteer_layout_is_refused_with_a_message_saying_so(
    tmp_path: Path,
) -> None:
    from lowcomm.checkpoint import Checkpointer, NoCheckpointError

    model = make_model(0)
    old = {  # what launch.volunteer.VolunteerTrainer saved before Trainer replaced it
        "model": model.state_dict(),
        "diloco": {"outer": {"theta": torch.zeros(3)}},
        "stateful": {},
        "inner_step": 7,
        "rng": torch.get_rng_state(),
    }
    with Checkpointer(CheckpointConfig(levels=(str(tmp_path),))) as ck:
        ck.save(7, old, metadata={"outer_step": 1})
    with pytest.raises(NoCheckpointError, match=r"older lowcomm.*new checkpoint directory"):
        _trainer(tmp_path, 0, Batches())
