"""Run-ahead never costs a committed step's side effects (``lowcomm.recovery.commit.may_run_ahead``).

A stage attempts step t + 1 while step t's vote is in flight, and writes step t's checkpoint and
refreshes the CheckFree+ (de)embedding copies only once it reads the verdict, after that attempt.
So a stage killed in the attempt ahead of a checkpoint step would never write the checkpoint, and
its replacement would restore an older one; likewise the copies. Steps whose commit checkpoints or
refreshes are therefore not run ahead of. Both scenarios kill at step 2, where committing step 1
(done = 2) checkpoints (``checkpoint_every=2``) and refreshes the copies
(``embedding_backup_every=2``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lowcomm.recovery.commit import may_run_ahead
from lowcomm.recovery.config import PipelineConfig, RecoveryConfig
from lowcomm.recovery.stages import StageConfig
from tests.recovery import test_pipeline as tp
from tests.recovery._harness import run_pipeline
from tests.recovery._stage_peer import same_tensors

STEP = 2


def _kill(stage: int, mb: int = 1, phase: str = "forward") -> dict[int, dict[str, object]]:
    return {stage: {"action": "kill", "step": STEP, "mb": mb, "phase": phase}}


def test_steps_whose_commit_checkpoints_or_refreshes_copies_are_not_run_ahead_of() -> None:
    stages = StageConfig(num_block_stages=3, width=16, num_heads=2, context=8)
    config = PipelineConfig(stages=stages, checkpoint_every=4)
    assert [s for s in range(1, 10) if may_run_ahead(None, s, 10, config)] == [1, 2, 3, 5, 6, 7, 9]
    plus = replace(config, recovery=RecoveryConfig(checkfree_plus=True, embedding_backup_every=3))
    assert [s for s in range(1, 10) if may_run_ahead(None, s, 10, plus)] == [1, 2, 5, 7]
    assert not may_run_ahead(None, 10, 10, config)  # past the run's last step
    assert not any(may_run_ahead(None, s, 10, replace(config, run_ahead=False)) for s in range(10))


@pytest.mark.timeout(300)
def test_adjacent_stages_killed_at_a_checkpoint_step_restore_the_newest_committed_checkpoint(
    tmp_path: Path,
) -> None:
    out = run_pipeline(tmp_path, tp.CONFIG, num_steps=4, faults={**_kill(1), **_kill(2, mb=0)})
    for s in (1, 2):
        assert (out.dump / f"fault{s}.txt").exists()  # the kill fired
        (report,) = out.of("recovered", s)
        assert report["rule"] == "checkpoint", report
        rebuilt = out.load(s, "replacement_rebuilt")["params"]
        # The checkpoint written at done = 2 holds the state after step 1, committed everywhere.
        after_step1 = out.load(s, "original_step1")["params"]
        assert same_tensors(rebuilt, after_step1), s
        assert not same_tensors(rebuilt, out.load(s, "original_step0")["params"]), s


@pytest.mark.timeout(300)
def test_the_embedding_stage_killed_at_a_copy_refresh_step_is_rebuilt_from_the_fresh_copy(
    tmp_path: Path,
) -> None:
    out = run_pipeline(tmp_path, tp.PLUS, num_steps=4, faults=_kill(0, phase="backward"))
    assert (out.dump / "fault0.txt").exists()
    (report,) = out.of("recovered", 0)
    rebuilt = out.load(0, "replacement_rebuilt")["params"]
    # The copies refreshed at done = 2 hold stage 0 after step 1.
    assert same_tensors(rebuilt, out.load(0, "original_step1")["params"]), report
    assert not same_tensors(rebuilt, out.load(0, "original_step0")["params"]), report
