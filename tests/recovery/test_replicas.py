"""Pipeline replicas with DiLoCo per stage group: a lost slot is a copy of its surviving replica.

2 replicas x 3 stages (6 processes, loopback). Each stage's two replicas are one peer group running
DiLoCo among themselves (an outer Nesterov step every ``OUTER_EVERY`` steps); each replica's stage 0
reads its own data, so the replicas' inner parameters differ mid-round. Stage 1 of one replica is
killed mid micro-batch at a step in the middle of a round: the replacement must be a bit-for-bit
copy of the surviving replica's *outer* state (outer parameters, outer momentum) and its inner
optimizer state, never an average and never the survivor's mid-round inner parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lowcomm.faults import KILLED_EXIT_CODE
from lowcomm.recovery.pipeline import PipelineConfig
from lowcomm.recovery.replicas import assign_slots, missing_slots
from lowcomm.recovery.stages import StageConfig
from tests.recovery._harness import run_pipeline

OUTER_EVERY = 2
CONFIG = PipelineConfig(
    stages=StageConfig(num_block_stages=2, width=16, num_heads=2, context=8),
    num_micro_batches=2,
    micro_batch_size=2,
    lr=3e-3,
    checkpoint_every=2,
    timeout_s=30.0,
    num_replicas=2,
    outer_every=OUTER_EVERY,
)
NUM_STEPS = 5
FAULT_STEP = 3  # the outer syncs run at the start of steps 2 and 4: step 3 is mid-round


def _equal(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested state (tensors, containers, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _dumped(out: Any, slot: str, step: int) -> str:
    """The dump of ``slot`` after ``step``: the one it applied tentatively if it was the victim,
    killed in the attempt it ran ahead of that step's verdict before it could report it."""
    name = f"original_step{step}"
    return name if (out.dump / f"stage{slot}_{name}.pt").exists() else f"original_applied{step}"


@pytest.mark.timeout(240)
def test_a_killed_stage_with_a_surviving_replica_is_a_bit_for_bit_copy_of_its_outer_state(
    tmp_path: Path,
) -> None:
    fault = {"action": "kill", "step": FAULT_STEP, "mb": 1, "phase": "forward"}
    out = run_pipeline(tmp_path, CONFIG, num_steps=NUM_STEPS, faults={1: fault}, timeout_s=200)
    assert out.exitcodes["original1"] == KILLED_EXIT_CODE  # the injected kill fired
    assert (out.dump / "fault1.txt").exists()
    # Which replica the victim was (its slot comes from the join order).
    lost_r = {e["replica"] for e in out.of("committed", 1) if e["step"] < FAULT_STEP}
    (recovered,) = out.of("recovered", 1)
    victim_r = recovered["replica"]
    survivor_r = 1 - victim_r
    assert victim_r in lost_r
    # Every slot applied each step exactly once, the faulty step only after the fault (the vote
    # is world-wide: the other replica's pipeline, which may have finished its attempt, was voted
    # down with it); the victim's own pipeline aborted it.
    fault_time = float((out.dump / "fault1.txt").read_text())
    # The victim, killed in the attempt it ran ahead of step FAULT_STEP - 1's verdict (which
    # committed it), applied that step but did not live to report it.
    for stage in range(3):
        for r in range(2):
            commits = {e["step"]: e for e in out.of("committed", stage, r)}
            steps = list(range(NUM_STEPS))
            if (stage, r) == (1, victim_r) and FAULT_STEP - 1 not in commits:
                assert FAULT_STEP - 1 in [e["step"] for e in out.of("applied", stage, r)]
                steps.remove(FAULT_STEP - 1)
            assert sorted(commits) == steps, (stage, r, commits)
            assert len(out.of("committed", stage, r)) == len(steps), (stage, r)
            assert commits[FAULT_STEP]["time"] > fault_time, (stage, r)
    for stage in (0, 2):
        assert FAULT_STEP in [e["step"] for e in out.of("aborted", stage, victim_r)], stage
    # Only the lost slot was rebuilt, by the replica rule, from its surviving replica.
    assert len(out.events["recovered"]) == 1
    assert recovered["rule"] == "replica" and recovered["step"] == FAULT_STEP
    assert recovered["sources"] == (f"replica:{survivor_r}",)
    assert recovered["weights"] == (1.0,)

    before = f"original_step{FAULT_STEP - 1}"  # what the slots held when the fault hit
    survivor = out.load(f"1r{survivor_r}", before)
    lost = out.load(f"1r{victim_r}", _dumped(out, f"1r{victim_r}", FAULT_STEP - 1))
    rebuilt = out.load(f"1r{victim_r}", "replacement_rebuilt")
    # A copy, bit for bit: the survivor's outer parameters, outer momentum, inner Adam state.
    assert survivor["outer"]["synced_for"] == OUTER_EVERY
    assert _equal(rebuilt["params"], survivor["outer"]["params"])
    assert _equal(rebuilt["outer"], survivor["outer"])
    assert _equal(rebuilt["optimizer"]["state"], survivor["optimizer"]["state"])
    # ... and not the survivor's mid-round inner parameters, nor the lost ones, nor an average.
    assert not _equal(rebuilt["params"], survivor["params"])
    assert not _equal(rebuilt["params"], lost["params"])
    average = {k: (survivor["params"][k] + lost["params"][k]) / 2 for k in lost["params"]}
    assert not _equal(rebuilt["params"], average)
    # The replicas really are DiLoCo replicas: their outer state agrees at every step (the two
    # lost-slot processes included), their inner parameters differ (each reads its own data).
    last = f"original_step{NUM_STEPS - 1}"
    for stage in range(3):
        dumps = [
            out.load(
                f"{stage}r{r}",
                last.replace("original", "replacement") if (stage, r) == (1, victim_r) else last,
            )
            for r in range(2)
        ]
        assert dumps[0]["outer"]["synced_for"] == 2 * OUTER_EVERY
        assert _equal(dumps[0]["outer"]["params"], dumps[1]["outer"]["params"]), stage
        assert not _equal(dumps[0]["params"], dumps[1]["params"]), stage
    assert _equal(lost["outer"], survivor["outer"])
    # The outer step at the start of step 2 equals plain torch's: the replicas' pseudo-gradients
    # (outer minus inner after step 1) averaged, then one Nesterov SGD step on the outer params.
    for stage in range(3):
        start = [out.load(f"{stage}r{r}", "original_step1") for r in range(2)]
        outer = {k: v.clone() for k, v in start[0]["outer"]["params"].items()}
        assert start[0]["outer"]["synced_for"] == -1  # not synced yet
        ref = torch.optim.SGD(list(outer.values()), lr=0.7, momentum=0.9, nesterov=True)
        for name, o in outer.items():
            o.grad = ((o - start[0]["params"][name]) + (o - start[1]["params"][name])) / 2
        ref.step()
        synced = out.load(f"{stage}r0", _dumped(out, f"{stage}r0", 2))["outer"]
        assert synced["synced_for"] == OUTER_EVERY
        assert _equal(synced["params"], outer), stage


def test_slots_are_kept_by_survivors_and_new_peers_take_the_free_replica_in_join_order() -> None:
    world = [("a", 0), ("b", 1), ("c", 0), ("d", 1)]
    slots = assign_slots(world, {}, 2)
    assert slots == {"a": (0, 0), "b": (1, 0), "c": (0, 1), "d": (1, 1)}
    # "b" (stage 1, replica 0) is lost; "e" joins stage 1 and takes replica 0, "f" finds no slot.
    live = {p: s for p, s in slots.items() if p != "b"}
    assert missing_slots(live, 2, 2) == {(1, 0)}
    again = assign_slots([("a", 0), ("c", 0), ("d", 1), ("e", 1), ("f", 1)], live, 2)
    assert again == {"a": (0, 0), "c": (0, 1), "d": (1, 1), "e": (1, 0)}
    assert missing_slots(again, 2, 2) == set()


def test_replicas_need_diloco_and_diloco_needs_replicas() -> None:
    stages = CONFIG.stages
    with pytest.raises(ValueError, match="outer_every"):
        PipelineConfig(stages=stages, num_replicas=2)
    with pytest.raises(ValueError, match="outer_every"):
        PipelineConfig(stages=stages, outer_every=4)
    with pytest.raises(ValueError, match="num_replicas"):
        PipelineConfig(stages=stages, num_replicas=0)
