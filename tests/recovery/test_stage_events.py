"""The stage harness's events outlive a stage's kill (``_stage_peer.arm_fault``).

A multiprocessing queue's ``put`` returns before its feeder thread has written the item, and the
feeder writes under a lock shared by every process of the queue. A stage that died (``os._exit``,
as a ``kill`` rule does) with its feeder mid-write lost that event and left the lock held: every
other stage's feeder then blocked for good, the harness received nothing more and waited out its
100 s bound with every stage finished (the adjacent-stages test's hang in CI). The fault's rule
now flushes the queue before the process dies.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lowcomm.faults import KILLED_EXIT_CODE
from tests.recovery._stage_peer import arm_fault

# Larger than a pipe's buffer (64 KiB): nobody reads until the fault fired, so the victim's feeder
# thread is still inside its write (holding the queue's write lock) when the victim dies, or has
# not begun it.
BIG = 4 << 20
STAGE = 2


def _victim(spec: dict[str, Any], events: Any) -> None:
    faults = arm_fault(spec, events)
    assert faults is not None
    events.put(("committed", STAGE, {"step": 2, "blob": b"x" * BIG}))
    faults.hit("pipeline.micro_batch", stage=STAGE, step=3, mb=0, phase="forward")
    raise AssertionError("the injected kill did not fire")


def _other_stage(events: Any) -> None:
    events.put(("done", 0, {"stage": 0}))


@pytest.mark.timeout(180)
def test_a_stage_killed_right_after_an_event_delivers_it_and_blocks_no_other_stage(
    tmp_path: Path,
) -> None:
    ctx = mp.get_context("fork")  # fast: the child only arms the fault and puts
    events: Any = ctx.Queue()
    spec = {
        "stage": STAGE,
        "dump": str(tmp_path),
        "fault": {"action": "kill", "step": 3, "mb": 0, "phase": "forward"},
    }
    victim = ctx.Process(target=_victim, args=(spec, events), daemon=True)
    other = ctx.Process(target=_other_stage, args=(events,), daemon=True)
    got: list[tuple[str, int, dict[str, Any]]] = []
    # The harness's reader, on a thread: a queue left with half an item blocks its get for good.
    reader = threading.Thread(target=lambda: got.extend(events.get() for _ in range(2)))
    reader.daemon = True
    try:
        victim.start()
        fault_file = tmp_path / f"fault{STAGE}.txt"  # written by the rule, before the flush
        while not fault_file.exists():
            assert victim.exitcode is None, f"the victim ended before its fault: {victim.exitcode}"
            time.sleep(0.05)
        reader.start()
        victim.join(60)
        assert victim.exitcode == KILLED_EXIT_CODE  # the injected kill fired
        other.start()
        reader.join(60)
        assert [kind for kind, _, _ in got] == ["committed", "done"], (
            "an event was lost, or the killed stage left the queue's write lock held"
        )
        assert got[0][2]["blob"] == b"x" * BIG
    finally:
        for p in (victim, other):
            if p.pid is not None and p.is_alive():
                p.kill()
                p.join(5)
