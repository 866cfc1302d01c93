"""The checkpoint-rollback baseline of the pipeline runtime (``PipelineConfig(on_loss="rollback")``):
a stage killed mid micro-batch makes *every* stage restore the newest checkpoint step all stages
hold, from the ``StageStore`` (never the dead peer's own disk), and redo the steps since.

The test asserts that the fault fired, that every stage restored exactly its checkpoint of that
step (parameters and optimizer state bit for bit, and the hash it reported), that the run went on
from that step, and that it ends identical, loss by loss and stage by stage, to a failure-free run
of the simulator (which agrees with the runtime bit for bit: ``test_pipeline.py``): the steps
redone after the rollback see the same batches, so the rollback loses time, never accuracy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from lowcomm.faults import KILLED_EXIT_CODE
from lowcomm.recovery.pipeline import PipelineConfig
from lowcomm.recovery.rules import clone_state, state_hash
from lowcomm.recovery.simulator import Method
from lowcomm.recovery.stages import StageConfig
from lowcomm.recovery.store import StageStore
from tests.recovery._harness import run_pipeline
from tests.recovery._stage_peer import batches, same_tensors, simulator_of

STAGES = StageConfig(num_block_stages=3, width=16, num_heads=2, context=8)
CONFIG = PipelineConfig(
    stages=STAGES,
    num_micro_batches=2,
    micro_batch_size=2,
    lr=3e-3,
    checkpoint_every=3,
    on_loss="rollback",
    timeout_s=30.0,
)
NUM_STEPS = 7
FAULT_STEP = 5  # checkpoints after 0, 3 and 6 steps: the kill at step 5 loses steps 3 and 4
ROLLBACK_TO = 3


def _equal_optimizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    sa, sb = a["state"], b["state"]
    return sa.keys() == sb.keys() and all(same_tensors(sa[k], sb[k]) for k in sa)


@pytest.mark.timeout(180)
def test_a_lost_stage_rolls_every_stage_back_to_the_newest_common_checkpoint(
    tmp_path: Path,
) -> None:
    fault = {"action": "kill", "step": FAULT_STEP, "mb": 1, "phase": "forward"}
    out = run_pipeline(tmp_path, CONFIG, num_steps=NUM_STEPS, faults={2: fault})
    assert out.exitcodes["original2"] == KILLED_EXIT_CODE  # the injected kill fired
    assert (out.dump / "fault2.txt").exists()
    store = StageStore(tmp_path / "store")
    redone = list(range(ROLLBACK_TO, NUM_STEPS))
    for s in range(4):
        label = "replacement" if s == 2 else "original"
        (report,) = out.of("recovered", s)  # every stage rolled back, once
        assert report["rule"] == "rollback" and report["step"] == ROLLBACK_TO, (s, report)
        assert report["sources"] == (f"checkpoint:{s}@{ROLLBACK_TO}",)
        assert report["lost_steps"] == FAULT_STEP - ROLLBACK_TO
        # Its state after the rollback is its checkpoint of that step, bit for bit: the store's
        # file, and the state it had committed after step ROLLBACK_TO - 1 (the dump).
        ckpt = store.load(s, step=ROLLBACK_TO)
        assert ckpt is not None and ckpt["step"] == ROLLBACK_TO
        rolled = out.load(s, f"{label}_rebuilt")
        before = out.load(s, f"original_step{ROLLBACK_TO - 1}")
        assert report["hash"] == state_hash(ckpt["params"]) == state_hash(before["params"])
        assert same_tensors(rolled["params"], ckpt["params"])
        assert _equal_optimizer(rolled["optimizer"], ckpt["optimizer"])
        assert _equal_optimizer(rolled["optimizer"], before["optimizer"])
        # ... and not the state it had reached before the fault.
        assert not same_tensors(
            rolled["params"], out.load(s, f"original_step{FAULT_STEP - 2}")["params"]
        )
        steps = [e["step"] for e in out.of("committed", s)]
        if s == 2:  # the victim committed up to the fault, its replacement from the rollback on;
            # killed in the attempt it ran ahead of step FAULT_STEP - 1's verdict (which committed
            # it), the victim applied that step but did not live to report it
            applied = [e["step"] for e in out.of("applied", s)]
            assert steps == list(range(FAULT_STEP)) + redone or (
                steps == list(range(FAULT_STEP - 1)) + redone and FAULT_STEP - 1 in applied
            ), (steps, applied)
        else:
            assert FAULT_STEP in [e["step"] for e in out.of("aborted", s)]
            assert steps == list(range(FAULT_STEP)) + redone, (s, steps)
    # The run ends identical to a failure-free one that followed the same steps.
    sim = simulator_of(CONFIG, NUM_STEPS, Method(name="no_failure", failures=False))
    batch = batches(CONFIG)
    sim_losses = [sim.train_step(step, *batch(step)) for step in range(NUM_STEPS)]
    losses = [(e["step"], e["loss"]) for e in out.of("committed", 0)]
    assert losses == [(step, sim_losses[step]) for step, _ in losses]  # the first pass and the redo
    for s in range(4):
        label = "replacement" if s == 2 else "original"
        final = out.load(s, f"{label}_step{NUM_STEPS - 1}")["params"]
        assert same_tensors(final, sim.modules[s].state_dict()), s


def test_the_store_keeps_the_newest_steps_and_finds_the_newest_common_one(tmp_path: Path) -> None:
    store = StageStore(tmp_path, keep=2)
    params = {"w": torch.arange(3.0)}
    for step in (0, 3, 6):
        store.save(0, step=step, params=clone_state(params), optimizer={})
    for step in (0, 3):  # stage 1 died between its commit of step 6 and its save
        store.save(1, step=step, params=clone_state(params), optimizer={})
    assert store.steps(0) == [3, 6] and store.steps(1) == [0, 3]
    assert store.common_step([0, 1]) == 3 and store.common_step([0]) == 6
    assert store.common_step([0, 2]) is None  # stage 2 has none
    newest = store.load(0)
    assert newest is not None and newest["step"] == 6
    three = store.load(0, step=3)
    assert three is not None and three["step"] == 3 and three["bytes"] > 0
    assert store.load(0, step=0) is None  # pruned
    store.save(0, step=3, params=clone_state(params), optimizer={})  # a redone step saves again
    assert store.steps(0) == [3, 6]


def test_rollback_refuses_what_its_checkpoints_do_not_hold() -> None:
    with pytest.raises(ValueError, match="on_loss"):
        replace(CONFIG, num_replicas=2, outer_every=2)
    with pytest.raises(ValueError, match="on_loss"):
        replace(CONFIG, on_loss="restart")  # type: ignore[arg-type]
