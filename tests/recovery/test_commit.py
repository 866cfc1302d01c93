"""A step applied while its vote is in flight (``lowcomm.recovery.commit``): undone bit for bit.

A stage that voted ok on step t applies it tentatively and attempts step t + 1 before the verdict
arrives; if the step is voted down, the stage must end up exactly where it was before step t (its
parameters and its optimizer state), and the retry of step t must run as if nothing had happened.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from lowcomm.comm import VoteResult
from lowcomm.recovery.commit import WATCH_S, TentativeStep, Votes
from lowcomm.recovery.pipeline import PipelineConfig
from lowcomm.recovery.simulator import Method
from lowcomm.recovery.stages import StageConfig
from tests.recovery._harness import run_pipeline
from tests.recovery._stage_peer import batches, simulator_of

STAGES = StageConfig(num_block_stages=3, width=16, num_heads=2, context=8)
CONFIG = PipelineConfig(
    stages=STAGES,
    num_micro_batches=2,
    micro_batch_size=2,
    lr=3e-3,
    # No checkpoint inside the run: a step whose commit checkpoints is never run ahead of.
    checkpoint_every=10,
    timeout_s=5.0,
)
NUM_STEPS = 5
FAULT_STEP = 3


def _state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in module.parameters()]
    for p in module.parameters():
        out += [v.clone() for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_undone_step_leaves_parameters_and_adam_state_as_before_it_and_a_kept_one_as_a_step() -> (
    None
):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(module.state_dict())
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.1)
    tentative = TentativeStep()

    def grads() -> None:
        for m in (module, twin):
            m.zero_grad()
            m(torch.ones(2, 4)).sum().backward()

    # The first step (Adam has no state yet) undone: no state is left behind.
    grads()
    tentative.apply(module, opt)
    assert tentative.pending and not torch.equal(module.weight, twin.weight)
    tentative.undo()
    assert not tentative.pending
    assert torch.equal(module.weight, twin.weight) and not opt.state
    # Kept steps equal plain steps; an undone one in between changes nothing.
    for undo in (False, True, False, True, False):
        grads()
        before = _state(module, opt)
        tentative.apply(module, opt)
        if undo:
            tentative.undo()
            assert _same(_state(module, opt), before)
        else:
            tentative.commit(opt)
            twin_opt.step()
            assert _same(_state(module, opt), _state(twin, twin_opt))
    assert not tentative.pending
    grads()
    tentative.commit(opt)  # nothing pending: the step is taken now
    twin_opt.step()
    assert _same(_state(module, opt), _state(twin, twin_opt))


@pytest.mark.timeout(180)
def test_a_stage_that_ran_ahead_of_a_step_voted_down_rolls_it_back_and_the_run_equals_no_failure(
    tmp_path: Path,
) -> None:
    # Stage 1 fails in micro-batch 1's backward of step 3: the last block stage (3) has already
    # sent its gradients on (stage 2 read them), so it votes ok, applies step 3 tentatively and
    # attempts step 4; the others vote fail. Stage 3 must undo step 3, and the retried run must
    # equal one without the fault bit for bit.
    fault = {"action": "error", "step": FAULT_STEP, "mb": 1, "phase": "backward"}
    out = run_pipeline(tmp_path, CONFIG, num_steps=NUM_STEPS, faults={1: fault})
    assert (out.dump / "fault1.txt").exists()  # the injected error fired
    assert not out.events["recovered"]
    assert [e["step"] for e in out.of("rolled_back", 3)] == [FAULT_STEP]
    assert [e["step"] for e in out.of("applied", 3)].count(FAULT_STEP) == 2  # undone, then kept
    assert FAULT_STEP + 1 in [e["step"] for e in out.of("aborted", 3)]  # the attempt ahead
    for s in range(4):
        assert [e["step"] for e in out.of("committed", s)] == list(range(NUM_STEPS)), s
        assert s == 3 or not out.of("rolled_back", s)
    sim = simulator_of(
        CONFIG,
        NUM_STEPS,
        Method(name="no_failure", failures=False, checkpoint_every=CONFIG.checkpoint_every),
    )
    batch = batches(CONFIG)
    for step in range(NUM_STEPS):
        sim.train_step(step, *batch(step))
        for s in range(4):
            got = out.load(s, f"original_step{step}")
            assert _same(list(got["params"].values()), list(sim.modules[s].state_dict().values()))
            want = sim.optimizers[s].state_dict()["state"]
            have = got["optimizer"]["state"]
            assert want.keys() == have.keys(), (step, s)
            for k in want:
                assert all(torch.equal(want[k][n], have[k][n]) for n in want[k]), (step, s, k)


class _Comm:
    """What ``Votes`` asks of a communicator: a vote answered at once, and the probe."""

    peer_group = 1
    heartbeat_timeout_s = 1.0

    def __init__(self, revision: int) -> None:
        self.revision = revision

    def vote(self, key: str, ok: bool, timeout_s: float) -> VoteResult:
        return VoteResult(ok=ok, failed=[], revision=self.revision, peers=["a", "b"])


def test_a_votes_answer_stands_in_for_the_watchers_probe_only_while_fresh_and_at_its_revision() -> (
    None
):
    comm = _Comm(revision=4)
    abort, stop = threading.Event(), threading.Event()
    reasons: list[str] = []
    votes = Votes(comm, 5.0, abort=abort, stop=stop, on_abort=reasons.append)  # type: ignore[arg-type]
    try:
        assert votes.needs_probe(4, time.monotonic())  # no vote answered yet
        assert votes.start("step0.e0", True, revision=4, abort=True).result().ok
        assert votes.seen is not None
        when = votes.seen[0]
        assert not votes.needs_probe(4, when)  # just answered at the revision watched
        assert not votes.needs_probe(4, when + WATCH_S / 2)
        assert votes.needs_probe(4, when + 1.5 * WATCH_S)  # stale: probe again
        assert votes.needs_probe(3, when)  # watching another revision
        assert not reasons
        comm.revision = 5  # the world moved before the next vote closed: its answer aborts
        assert votes.start("step1.e1", True, revision=4, abort=True).result().revision == 5
        assert len(reasons) == 1 and "revision 4 -> 5" in reasons[0]  # the stage is aborted
        assert votes.needs_probe(4, votes.seen[0])
    finally:
        votes.close()
