"""The comm pieces the pipeline runtime stands on: the world-wide vote and the live revision."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comm"))

from _control_harness import (  # type: ignore[import-not-found]
    addr,
    connect_all,
    run_threads,
    start_master,
)

from lowcomm.comm import Communicator


def _close(comms: list[Communicator]) -> None:
    for c in comms:
        c.close()


@pytest.mark.timeout(60)
def test_a_vote_gives_every_peer_of_every_group_the_same_verdict() -> None:
    master = start_master()
    try:
        comms = connect_all(addr(master), 3, groups=[0, 1, 2])
        assert sorted(comms[0].peer_groups.values()) == [0, 1, 2]
        ok = run_threads([lambda c=c: c.vote("step0", True, timeout_s=20) for c in comms])
        assert all(r.ok and not r.failed for r in ok) and len({r.revision for r in ok}) == 1
        # One peer votes fail: every peer gets the same refusal, naming it.
        votes = [True, False, True]
        res = run_threads(
            [
                lambda c=c, v=v: c.vote("step1", v, timeout_s=20)
                for c, v in zip(comms, votes, strict=True)
            ]
        )
        assert all(not r.ok and r.failed == [comms[1].peer_id] for r in res)
        _close(comms)
    finally:
        master.stop()


@pytest.mark.timeout(60)
def test_a_peer_lost_before_the_vote_closes_it_on_the_survivors_with_a_new_revision() -> None:
    master = start_master()
    try:
        comms = connect_all(addr(master), 3, groups=[0, 1, 2])
        before = comms[0].live_revision()
        assert before == comms[0].revision
        comms[2].close()  # leaves: the master drops it at once
        assert comms[0].live_revision() > before  # seen without a phase
        assert comms[0].revision == before  # ... and the phase view did not move
        res = run_threads([lambda c=c: c.vote("step0", True, timeout_s=20) for c in comms[:2]])
        assert all(r.ok and r.revision > before for r in res)
        assert all(comms[2].peer_id not in r.peers for r in res)
        _close(comms[:2])
    finally:
        master.stop()
