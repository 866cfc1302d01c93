"""Faults: a peer killed mid-operation or at the gate, a SIGSTOPped peer, phases out of lockstep,
poisoned (NaN/inf) contributions.

Each test injects the fault, asserts it fired, bounds the time the survivors needed to notice,
checks nothing partial was applied and that the retry among the survivors gives the exact result.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
import torch
from _control_harness import TOKEN, Peer, addr, connect_all, run_threads, start_master

from lowcomm.comm import CommConfig, Communicator
from lowcomm.comm.errors import CommTimeoutError, NonFiniteError, PeerFailureError, TopologyError
from lowcomm.comm.shaper import Shaper
from lowcomm.faults import KILLED_EXIT_CODE, FaultInjector

NUMEL = 1_000_000  # 4 MB: about a second per all-reduce through a 50 Mbit/s shaper


def _join(master_address: str, n: int, *, shaped: bool) -> Communicator:
    config = CommConfig(
        timeout_s=30.0,
        poll_s=0.2,
        num_connections=2,
        shaper=Shaper(bandwidth_bps=50e6) if shaped else None,
    )
    c = Communicator(master_address, token=TOKEN, config=config)
    c.connect(timeout_s=60)
    while c.world_size < n:
        c.update_topology(timeout_s=60)
    return c


def _peer(
    master_address: str, value: float, fault: str | None, op_timeout_s: float
) -> dict[str, Any]:
    c = _join(master_address, 3, shaped=True)
    x = torch.full((NUMEL,), value)
    if fault is not None:
        sig = signal.SIGKILL if fault == "kill" else signal.SIGSTOP
        # The fault lands while the all-reduce is on the wire.
        threading.Timer(0.3, os.kill, args=(os.getpid(), sig)).start()
    start = time.monotonic()
    first_error = message = ""
    try:
        c.all_reduce(x, "sum", timeout_s=op_timeout_s)
    except (PeerFailureError, CommTimeoutError) as e:
        first_error, message = type(e).__name__, str(e)
    failed_after_s = time.monotonic() - start
    untouched = bool(torch.all(x == value))
    info = c.all_reduce_with_retry(x, "sum", timeout_s=30, max_attempts=3)
    out = {
        "first_error": first_error,
        "message": message,
        "failed_after_s": failed_after_s,
        "untouched": untouched,
        "retry_world": info.world_size,
        "result": float(x[0]),
        "uniform": bool(torch.all(x == x[0])),
    }
    c.close()
    return out


@pytest.mark.timeout(120)
def test_peer_killed_mid_all_reduce_fails_fast_on_survivors_and_the_retry_is_exact() -> None:
    master = start_master(heartbeat_timeout_s=3.0)
    try:
        op_timeout_s = 15.0
        peers = [
            Peer(_peer, addr(master), float(v), "kill" if v == 3 else None, op_timeout_s)
            for v in (1, 2, 3)
        ]
        survivors = [p.result(timeout_s=100) for p in peers[:2]]
        peers[2].process.join(10)
        assert peers[2].process.exitcode == -signal.SIGKILL  # the fault fired
        for s in survivors:
            assert s["first_error"] in ("PeerFailureError", "CommTimeoutError"), s
            assert s["failed_after_s"] < op_timeout_s, s
            assert s["untouched"], "a partial result was applied"
            assert s["retry_world"] == 2 and s["result"] == 3.0 and s["uniform"], s
        assert "session connection closed" in next(iter(master.snapshot()["evicted"].values()))
    finally:
        master.stop()


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.timeout(120)
def test_sigstopped_peer_is_evicted_after_the_heartbeat_timeout_not_a_hang() -> None:
    master = start_master(heartbeat_timeout_s=3.0)
    peers: list[Peer] = []
    try:
        # The op timeout is far longer than the heartbeat timeout: the survivors' rings are
        # aborted when the master evicts the stopped peer, not when their own timeout expires.
        op_timeout_s = 30.0
        peers = [
            Peer(_peer, addr(master), float(v), "stop" if v == 3 else None, op_timeout_s)
            for v in (1, 2, 3)
        ]
        survivors = [p.result(timeout_s=100) for p in peers[:2]]
        assert _proc_state(peers[2].process.pid) == "T"  # the fault fired: it is stopped
        evicted = master.snapshot()["evicted"]
        assert any("no heartbeat" in why for why in evicted.values()), evicted
        for s in survivors:
            assert s["first_error"] in ("CommTimeoutError", "PeerFailureError"), s
            assert "no heartbeat" in s["message"], s
            assert s["failed_after_s"] < op_timeout_s, s
            assert s["untouched"], "a partial result was applied"
            assert s["retry_world"] == 2 and s["result"] == 3.0 and s["uniform"], s
    finally:
        for p in peers:
            p.kill()
        master.stop()


@pytest.mark.timeout(60)
def test_phases_out_of_lockstep_raise_on_both_peers_instead_of_hanging() -> None:
    master = start_master()
    try:
        a, b = connect_all(addr(master), 2)
        x = torch.ones(10)
        start = time.monotonic()
        res = run_threads(
            [lambda: a.update_topology(timeout_s=30), lambda: b.all_reduce(x, "sum", timeout_s=30)]
        )
        elapsed = time.monotonic() - start
        assert all(isinstance(r, TopologyError) for r in res), res
        assert "out of lockstep" in str(res[0]) and "update_topology" in str(res[0])
        assert elapsed < 15, "detected at once, not by the 30 s timeout"
        assert torch.equal(x, torch.ones(10))
        # The same for a sync against an all-reduce; afterwards, both go on in step.
        from lowcomm.comm import SharedState

        state = SharedState({"w": torch.zeros(3)})
        res = run_threads(
            [
                lambda: a.sync_shared_state(state, timeout_s=30),
                lambda: b.all_reduce(x, "sum", timeout_s=30),
            ]
        )
        assert all(isinstance(r, TopologyError) for r in res), res
        run_threads(
            [lambda: a.update_topology(timeout_s=10), lambda: b.update_topology(timeout_s=10)]
        )
        y = torch.ones(10)
        run_threads(
            [
                lambda: a.all_reduce(x, "sum", timeout_s=10),
                lambda: b.all_reduce(y, "sum", timeout_s=10),
            ]
        )
        assert torch.equal(x, torch.full((10,), 2.0))
        a.close()
        b.close()
    finally:
        master.stop()


def _stalling_joiner(master_address: str) -> None:
    c = Communicator(master_address, token=TOKEN, config=CommConfig(timeout_s=60.0, poll_s=0.2))
    # Stops itself while it waits in connect(), before anyone admitted it.
    threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGSTOP)).start()
    c.connect(timeout_s=60)


@pytest.mark.timeout(90)
def test_a_joiner_that_stalls_before_admission_never_blocks_the_running_peers() -> None:
    # The heartbeat timeout is longer than the test's steps: only the admission rule (a
    # pending peer must be polling to be admitted) keeps the stalled joiner out.
    master = start_master(heartbeat_timeout_s=8.0)
    joiner: Peer | None = None
    try:
        a, b = connect_all(addr(master), 2)
        joiner = Peer(_stalling_joiner, addr(master))
        while not master.snapshot()["pending"]:
            time.sleep(0.05)
        while _proc_state(joiner.process.pid) != "T":
            time.sleep(0.05)
        time.sleep(2.5)  # past the admission grace: it no longer polls
        worlds: list[int] = []

        def step(c: Communicator) -> None:
            for _ in range(10):
                if c.are_peers_pending(timeout_s=30):
                    c.update_topology(timeout_s=30)
                worlds.append(c.world_size)
                x = torch.ones(100)
                c.all_reduce(x, "sum", timeout_s=30)
                worlds.append(int(x[0]))

        res = run_threads([lambda: step(a), lambda: step(b)], timeout_s=80)
        assert res == [None, None], res
        assert set(worlds) == {2}, "the stalled joiner was admitted into the running world"
        # It is evicted by the heartbeat timeout while still pending.
        deadline = time.monotonic() + 30
        while not master.snapshot()["evicted"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any("no heartbeat" in why for why in master.snapshot()["evicted"].values())
        a.close()
        b.close()
    finally:
        if joiner is not None:
            joiner.kill()
        master.stop()


def _gate_peer(master_address: str, value: float, die_at_gate: bool) -> dict[str, Any]:
    faults = FaultInjector()
    if die_at_gate:
        # SIGKILL-like death right after the gate opened, before any ring connection exists.
        faults.inject("comm.gate", kill=True)
    config = CommConfig(timeout_s=30.0, poll_s=0.2, num_connections=2, faults=faults)
    c = Communicator(master_address, token=TOKEN, config=config)
    c.connect(timeout_s=60)
    while c.world_size < 3:
        c.update_topology(timeout_s=60)
    x = torch.full((1000,), value)
    start = time.monotonic()
    first_error = ""
    try:
        c.all_reduce(x, "sum", timeout_s=30)
    except (PeerFailureError, CommTimeoutError) as e:
        first_error = type(e).__name__
    failed_after_s = time.monotonic() - start
    untouched = bool(torch.all(x == value))
    info = c.all_reduce_with_retry(x, "sum", timeout_s=30, max_attempts=3)
    out = {
        "first_error": first_error,
        "failed_after_s": failed_after_s,
        "untouched": untouched,
        "retry_world": info.world_size,
        "result": float(x[0]),
    }
    c.close()
    return out


@pytest.mark.timeout(120)
def test_peer_killed_after_the_gate_opened_costs_the_survivors_about_a_second() -> None:
    # Before: the survivor waiting for the dead peer's ring connections sat in the ring build for
    # 2 x heartbeat + 5 s (11 s here) although the master had evicted the dead peer at once.
    master = start_master(heartbeat_timeout_s=3.0)
    peers: list[Peer] = []
    try:
        peers = [Peer(_gate_peer, addr(master), float(v), v == 3) for v in (1, 2, 3)]
        survivors = [p.result(timeout_s=100) for p in peers[:2]]
        peers[2].process.join(10)
        assert peers[2].process.exitcode == KILLED_EXIT_CODE  # the comm.gate fault fired
        for s in survivors:
            assert s["first_error"] == "PeerFailureError", s
            assert s["failed_after_s"] < 1.5, s  # the gate wait plus about one round trip
            assert s["untouched"] and s["retry_world"] == 2 and s["result"] == 3.0, s
    finally:
        for p in peers:
            p.kill()
        master.stop()


@pytest.mark.timeout(60)
def test_three_peers_in_different_phases_or_tags_all_get_the_same_prompt_topology_error() -> None:
    master = start_master()
    try:
        a, b, c = connect_all(addr(master), 3)
        xs = [torch.ones(10) for _ in range(3)]
        start = time.monotonic()
        res = run_threads(
            [
                lambda: a.update_topology(timeout_s=30),
                lambda: b.all_reduce_with_retry(xs[1], "sum", timeout_s=30),
                lambda: c.all_reduce_with_retry(xs[2], "sum", timeout_s=30),
            ]
        )
        assert all(isinstance(r, TopologyError) for r in res), res
        assert len({str(r).split(": ", 1)[1] for r in res}) == 1, "one message for everyone"
        # Different tags: two peers agree, the third does not; all three fail at once.
        res += run_threads(
            [
                lambda: a.all_reduce_with_retry(xs[0], "sum", tag=1, timeout_s=30),
                lambda: b.all_reduce_with_retry(xs[1], "sum", tag=1, timeout_s=30),
                lambda: c.all_reduce_with_retry(xs[2], "sum", tag=2, timeout_s=30),
            ]
        )
        elapsed = time.monotonic() - start
        assert all(isinstance(r, TopologyError) and "lockstep" in str(r) for r in res), res
        assert elapsed < 10, f"took {elapsed:.1f} s: somebody waited for its 30 s timeout"
        assert all(torch.equal(x, torch.ones(10)) for x in xs)
        # Back in step, they go on.
        run_threads(
            [
                lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=10)
                for c, x in zip((a, b, c), xs, strict=True)
            ]
        )
        assert all(torch.equal(x, torch.full((10,), 3.0)) for x in xs)
        for comm in (a, b, c):
            comm.close()
    finally:
        master.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("quantization", [None, "uint8"])
def test_a_nan_contribution_fails_the_all_reduce_promptly_on_every_peer_naming_the_peer(
    quantization: str | None,
) -> None:
    master = start_master()
    try:
        comms = connect_all(addr(master), 3)
        xs = [torch.ones(1000) for _ in comms]
        xs[1][7] = float("nan") if quantization is None else float("inf")
        start = time.monotonic()
        res = run_threads(
            [
                lambda c=c, x=x: c.all_reduce_with_retry(
                    x, "avg", quantization=quantization, timeout_s=30, check_finite=True
                )
                for c, x in zip(comms, xs, strict=True)
            ]
        )
        elapsed = time.monotonic() - start
        assert all(isinstance(r, NonFiniteError) for r in res), res
        assert all(comms[1].peer_id in str(r) for r in res), res
        assert elapsed < 5, f"took {elapsed:.1f} s: the poison was noticed by a timeout"
        assert torch.equal(xs[0], torch.ones(1000)) and torch.equal(xs[2], torch.ones(1000))
        for c in comms:
            c.close()
    finally:
        master.stop()
