"""The multi-process pipeline runtime under faults: stages killed or stopped mid micro-batch.

Each test asserts that the fault fired (the victim's exit code, or its stopped state), that every
other stage aborted the step and no stage applied it (each step committed exactly once, and the
sources served their state of the step before), and that the rebuilt stage equals a plain-torch
reference of its rule bit for bit and differs from the lost one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lowcomm.faults import KILLED_EXIT_CODE
from lowcomm.recovery.pipeline import PipelineConfig
from lowcomm.recovery.stages import StageConfig
from tests.recovery._harness import Outcome, run_pipeline

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
        # the victim committed the steps before the fault, its replacement the rest, once each
        assert steps == list(range(NUM_STEPS)), (s, steps)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
    assert _equal(rebuilt, expected)
    lost = out.load(2, f"original_step{FAULT_STEP - 1}")["params"]
    assert not _equal(rebuilt, lost)
