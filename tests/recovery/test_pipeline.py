"""The multi-process pipeline runtime under faults: stages killed or stopped mid micro-batch.

Each test asserts that the fault fired (the victim's exit code, or its stopped state), that every
other stage aborted the step and no stage applied it (each step committed exactly once, and the
sources served their state of the step before), and that the rebuilt stage equals a plain-torch
reference of its rule bit for bit and differs from the lost one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from lowcomm.comm import Communicator
from lowcomm.faults import KILLED_EXIT_CODE
from lowcomm.recovery import RecoveryConfig
from lowcomm.recovery.pipeline import PipelineConfig, StagePeer
from lowcomm.recovery.simulator import Method, SimResult
from lowcomm.recovery.stages import StageConfig
from lowcomm.recovery.store import StageStore
from tests.recovery._harness import Outcome, run_pipeline
from tests.recovery._stage_peer import batches, same_tensors, simulator_of

STAGES = StageConfig(num_block_stages=3, width=16, num_heads=2, context=8)
CONFIG = PipelineConfig(
    stages=STAGES,
    num_micro_batches=2,
    micro_batch_size=2,
    lr=3e-3,
    checkpoint_every=2,
    timeout_s=30.0,
)
NUM_STEPS = 5
FAULT_STEP = 3


def _kill(
    stage: int, *, mb: int = 1, phase: str = "forward", action: str = "kill"
) -> dict[int, dict[str, Any]]:
    return {stage: {"action": action, "step": FAULT_STEP, "mb": mb, "phase": phase}}


def _assert_step_aborted_everywhere_and_applied_once(
    out: Outcome, lost: set[int], num_stages: int
) -> None:
    for s in range(num_stages):
        if s in lost:
            continue
        aborted = [e["step"] for e in out.of("aborted", s)]
        assert FAULT_STEP in aborted, (s, aborted)  # every other stage aborted the step
        steps = [e["step"] for e in out.of("committed", s)]
        assert steps == list(range(NUM_STEPS)), (s, steps)  # each step applied exactly once
    for s in lost:
        steps = [e["step"] for e in out.of("committed", s)]
        # the victim committed the steps before the fault, its replacement the rest, once each;
        # a victim killed in the attempt it ran ahead of step FAULT_STEP - 1's verdict (which
        # committed it) applied that step but did not live to report it
        unreported = [x for x in range(NUM_STEPS) if x != FAULT_STEP - 1]
        applied = [e["step"] for e in out.of("applied", s)]
        assert steps == list(range(NUM_STEPS)) or (
            steps == unreported and FAULT_STEP - 1 in applied
        ), (s, steps, applied)


def _held(out: Outcome, stage: int, step: int) -> dict[str, torch.Tensor]:
    """What the victim ``stage`` held after ``step``: as it committed it or, killed in the attempt
    it ran ahead of that step's verdict, as it applied it."""
    name = f"original_step{step}"
    if not (out.dump / f"stage{stage}_{name}.pt").exists():
        name = f"original_applied{step}"
    params: dict[str, torch.Tensor] = out.load(stage, name)["params"]
    return params


@pytest.fixture(scope="module")
def middle_kill(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return run_pipeline(
        tmp_path_factory.mktemp("middle"), CONFIG, num_steps=NUM_STEPS, faults=_kill(2)
    )


@pytest.mark.timeout(180)
def test_middle_stage_killed_mid_micro_batch_is_rebuilt_by_checkfree_from_its_neighbours(
    middle_kill: Outcome,
) -> None:
    out = middle_kill
    assert out.exitcodes["original2"] == KILLED_EXIT_CODE  # the injected kill fired
    assert (out.dump / "fault2.txt").exists()
    _assert_step_aborted_everywhere_and_applied_once(out, {2}, 4)
    (report,) = out.of("recovered", 2)
    assert report["rule"] == "checkfree" and report["step"] == FAULT_STEP
    assert report["sources"] == ("neighbour:1", "neighbour:3")
    # The plain-torch reference: the neighbours' state and norms after step FAULT_STEP - 1.
    prev = out.load(1, f"original_step{FAULT_STEP - 1}")
    nxt = out.load(3, f"original_step{FAULT_STEP - 1}")
    w_prev, w_next = prev["grad_norm"][0] + 1e-4, nxt["grad_norm"][0] + 1e-4
    assert report["weights"] == (w_prev, w_next)
    rebuilt = out.load(2, "replacement_rebuilt")["params"]
    expected = {
        k: (w_next * nxt["params"][k] + w_prev * prev["params"][k]) / (w_next + w_prev)
        for k in prev["params"]
    }
    assert same_tensors(rebuilt, expected)
    lost = _held(out, 2, FAULT_STEP - 1)
    assert not same_tensors(rebuilt, lost)


@pytest.mark.timeout(60)
def test_the_simulator_and_the_runtime_agree_bit_for_bit_on_a_run_with_one_failure(
    middle_kill: Outcome,
) -> None:
    out = middle_kill
    sim = simulator_of(
        CONFIG, NUM_STEPS, Method(name="gradavg", checkpoint_every=CONFIG.checkpoint_every)
    )
    batch = batches(CONFIG)
    result = SimResult(method="gradavg")
    losses = [e["loss"] for e in out.of("committed", 0)]
    for step in range(NUM_STEPS):
        if step == FAULT_STEP:
            sim.destroy(2)
            sim.recover(step, frozenset({2}), result)
        assert sim.train_step(step, *batch(step)) == losses[step], step
        for s in range(4):
            label = "replacement" if s == 2 and step >= FAULT_STEP else "original"
            got = (
                _held(out, s, step)
                if label == "original"
                else out.load(s, f"{label}_step{step}")["params"]
            )
            assert same_tensors(sim.modules[s].state_dict(), got), (step, s)
    ((_, report),) = result.reports
    assert report.weights == out.of("recovered", 2)[0]["weights"]


@pytest.mark.timeout(180)
def test_adjacent_stages_killed_together_fall_back_to_their_checkpoints(tmp_path: Path) -> None:
    faults = {**_kill(1, mb=1), **_kill(2, mb=0)}
    out = run_pipeline(tmp_path, CONFIG, num_steps=NUM_STEPS, faults=faults)
    assert out.exitcodes["original1"] == out.exitcodes["original2"] == KILLED_EXIT_CODE
    _assert_step_aborted_everywhere_and_applied_once(out, {1, 2}, 4)
    # checkpoint_every=2: the newest checkpoint before step 3 holds the state after steps 0, 1.
    for s in (1, 2):
        (report,) = out.of("recovered", s)
        assert report["rule"] == "checkpoint" and report["sources"] == (f"checkpoint:{s}",)
        rebuilt = out.load(s, "replacement_rebuilt")["params"]
        assert same_tensors(rebuilt, out.load(s, "original_step1")["params"])
        assert not same_tensors(rebuilt, _held(out, s, FAULT_STEP - 1))


@pytest.mark.timeout(180)
def test_a_stage_stopped_past_the_heartbeat_timeout_is_evicted_and_rebuilt(tmp_path: Path) -> None:
    out = run_pipeline(
        tmp_path,
        CONFIG,
        num_steps=NUM_STEPS,
        faults=_kill(2, action="stop"),
        heartbeat_timeout_s=2.0,
    )
    assert out.stopped_seen  # the injected SIGSTOP fired: the victim sat stopped
    assert (out.dump / "fault2.txt").exists()
    _assert_step_aborted_everywhere_and_applied_once(out, {2}, 4)
    (report,) = out.of("recovered", 2)
    assert report["rule"] == "checkfree"
    prev = out.load(1, f"original_step{FAULT_STEP - 1}")
    nxt = out.load(3, f"original_step{FAULT_STEP - 1}")
    w_prev, w_next = prev["grad_norm"][0] + 1e-4, nxt["grad_norm"][0] + 1e-4
    rebuilt = out.load(2, "replacement_rebuilt")["params"]
    expected = {
        k: (w_next * nxt["params"][k] + w_prev * prev["params"][k]) / (w_next + w_prev)
        for k in prev["params"]
    }
    assert same_tensors(rebuilt, expected)
    assert not same_tensors(rebuilt, _held(out, 2, FAULT_STEP - 1))


PLUS = replace(
    CONFIG,
    stages=replace(STAGES, num_block_stages=4),
    recovery=RecoveryConfig(checkfree_plus=True, embedding_backup_every=2),
)


@pytest.mark.timeout(180)
def test_the_first_and_last_block_stages_with_checkfree_plus_are_copies_of_their_swap_partners(
    tmp_path: Path,
) -> None:
    # Both edges at once (not adjacent): two rebuilds in one recovery.
    faults = {**_kill(1, mb=1), **_kill(4, mb=0)}
    out = run_pipeline(tmp_path, PLUS, num_steps=NUM_STEPS, faults=faults)
    assert out.exitcodes["original1"] == out.exitcodes["original4"] == KILLED_EXIT_CODE
    _assert_step_aborted_everywhere_and_applied_once(out, {1, 4}, 5)
    for stage, partner in ((1, 2), (4, 3)):
        (report,) = out.of("recovered", stage)
        assert report["rule"] == "checkfree_plus"
        assert report["sources"] == (f"neighbour:{partner}",)
        rebuilt = out.load(stage, "replacement_rebuilt")["params"]
        assert same_tensors(rebuilt, out.load(partner, f"original_step{FAULT_STEP - 1}")["params"])
        assert not same_tensors(rebuilt, _held(out, stage, FAULT_STEP - 1))
        # A replacement holder receives the current (de)embedding as it joins.
        backup = out.load(stage, f"replacement_step{FAULT_STEP}")["backup"]
        assert same_tensors(backup, out.load(0, f"original_step{FAULT_STEP - 1}")["params"])


@pytest.mark.timeout(180)
def test_the_embedding_stage_with_checkfree_plus_is_rebuilt_from_a_neighbours_copy(
    tmp_path: Path,
) -> None:
    out = run_pipeline(tmp_path, PLUS, num_steps=NUM_STEPS, faults=_kill(0, phase="backward"))
    assert out.exitcodes["original0"] == KILLED_EXIT_CODE
    _assert_step_aborted_everywhere_and_applied_once(out, {0}, 5)
    (report,) = out.of("recovered", 0)
    assert report["rule"] == "checkfree_plus" and report["sources"] == ("backup:1",)
    # embedding_backup_every=2: the copy is stage 0 after steps 0 and 1 (refreshed at done=2,
    # after the dump of step 1, so step 2's dump holds it).
    rebuilt = out.load(0, "replacement_rebuilt")["params"]
    assert same_tensors(rebuilt, out.load(1, "original_step2")["backup"])
    assert same_tensors(rebuilt, out.load(0, "original_step1")["params"])
    assert not same_tensors(rebuilt, _held(out, 0, FAULT_STEP - 1))


@pytest.mark.timeout(180)
def test_a_neighbour_killed_during_the_rebuild_transfer_makes_the_recovery_retry_then_fall_back(
    tmp_path: Path,
) -> None:
    # Stage 2 dies mid step; stage 3, serving its state to 2's replacement, dies too: the second
    # recovery finds two adjacent stages lost and restores both from their checkpoints.
    faults = {
        **_kill(2),
        3: {"point": "pipeline.serve", "action": "kill", "step": FAULT_STEP},
    }
    out = run_pipeline(tmp_path, CONFIG, num_steps=NUM_STEPS, faults=faults)
    assert out.exitcodes["original2"] == out.exitcodes["original3"] == KILLED_EXIT_CODE
    assert (out.dump / "fault3.txt").exists()  # it died serving, not before
    _assert_step_aborted_everywhere_and_applied_once(out, {2, 3}, 4)
    for s in (2, 3):
        (report,) = out.of("recovered", s)
        assert report["rule"] == "checkpoint"
        rebuilt = out.load(s, "replacement_rebuilt")["params"]
        assert same_tensors(rebuilt, out.load(s, "original_step1")["params"])
        assert not same_tensors(rebuilt, _held(out, s, FAULT_STEP - 1))


@pytest.mark.timeout(180)
def test_a_stage_failing_on_its_own_votes_the_step_down_and_every_stage_retries_it(
    tmp_path: Path,
) -> None:
    # Nobody is lost: the stages waiting on stage 2 give up at their receive's timeout, the step
    # is voted down and retried with no recovery, and the run equals one without the fault.
    config = replace(CONFIG, timeout_s=5.0)
    out = run_pipeline(tmp_path, config, num_steps=NUM_STEPS, faults=_kill(2, action="error"))
    assert (out.dump / "fault2.txt").exists()  # the injected error fired
    assert not out.events["recovered"]
    _assert_step_aborted_everywhere_and_applied_once(out, set(), 4)
    assert FAULT_STEP in [e["step"] for e in out.of("aborted", 2)]
    sim = simulator_of(
        CONFIG,
        NUM_STEPS,
        Method(name="no_failure", failures=False, checkpoint_every=CONFIG.checkpoint_every),
    )
    batch = batches(CONFIG)
    for step in range(NUM_STEPS):
        sim.train_step(step, *batch(step))
    for s in range(4):
        got = out.load(s, f"original_step{NUM_STEPS - 1}")["params"]
        assert same_tensors(sim.modules[s].state_dict(), got), s


def test_bad_pipeline_settings_are_refused_naming_the_field(tmp_path: Path) -> None:
    for bad in ({"num_micro_batches": 5}, {"micro_batch_size": 0}, {"timeout_s": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            replace(CONFIG, **bad)
    store = StageStore(tmp_path)
    with pytest.raises(ValueError, match="no stage"):
        StagePeer(Communicator("127.0.0.1:1", peer_group=7), CONFIG, store=store)
    with pytest.raises(ValueError, match="stage 0 needs batches"):
        StagePeer(Communicator("127.0.0.1:1", peer_group=0), CONFIG, store=store)
    assert store.load(1) is None
    store.save(1, step=2, params={"w": torch.ones(2)}, optimizer={"state": {}})
    assert store.load(1)["step"] == 2  # type: ignore[index]
