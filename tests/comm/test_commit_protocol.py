"""The commit protocol across master crashes: all or nothing, whatever message the master died at.

A master in a subprocess kills itself (``master.commit``, ``kill=True``) at each message of the
commit protocol in turn (each peer's vote received, each verdict sent, the first and the later
ones, twice each) and is restarted on the same address. Three peers all-reduce round after round
throughout; every round's contribution names its round, so a peer that applied a round the
others aborted (and went on one round ahead) shows up as a mixed result.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import torch
from _control_harness import TOKEN, Peer, connect_all, run_threads, start_master

from lowcomm.comm import Communicator, Master
from lowcomm.comm.errors import CommTimeoutError, PeerFailureError
from lowcomm.faults import KILLED_EXIT_CODE, FaultInjector

HEARTBEAT_TIMEOUT_S = 2.0
NUM_PEERS = 3
# Every message of the protocol for three peers: each vote received, each verdict sent.
KILL_POINTS = [(m, i) for m in ("vote", "verdict") for i in range(NUM_PEERS)]


def _serve_master(port: int, message: str | None, index: int) -> None:
    faults = FaultInjector()
    if message is not None:
        faults.inject("master.commit", kill=True, where={"message": message, "index": index})
    Master(
        ("127.0.0.1", port), token=TOKEN, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, faults=faults
    ).start()
    threading.Event().wait()


def _contribution(r: int, k: int) -> torch.Tensor:
    x = torch.zeros(2 + NUM_PEERS)
    x[0] = r + 1  # the round: a sum over peers of different rounds is not 3 * (r + 1)
    x[1] = (k + 1) * (r + 1)
    x[2 + k] = 1.0
    return x


def _rounds(comm: Communicator, k: int, target: list[int], progress: list[int]) -> dict[str, Any]:
    state = torch.zeros(2 + NUM_PEERS)
    applied: list[int] = []
    mixed: list[int] = []
    revision = 0
    r = 0
    while r < target[0]:
        x = _contribution(r, k)
        for _attempt in range(30):
            try:
                comm.all_reduce(x, "sum", timeout_s=30)
                break
            except (PeerFailureError, CommTimeoutError):
                assert torch.equal(x, _contribution(r, k)), "an aborted round touched the tensor"
        else:
            raise AssertionError(f"round {r} never committed")
        if x[0] != NUM_PEERS * (r + 1):
            mixed.append(r)
        state += x
        revision += 1
        applied.append(r)
        r += 1
        progress[k] = r
    return {"state": state, "applied": applied, "mixed": mixed, "revision": revision}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(150)
def test_master_killed_at_every_commit_message_leaves_every_peer_with_the_same_rounds() -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    master = Peer(_serve_master, port, None, 0)
    comms: list[Communicator] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                comms = connect_all(address, NUM_PEERS)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        master.kill()  # the first master carries no fault; the killing ones follow
        target = [10**9]
        progress = [0] * NUM_PEERS
        results: list[Any] = []
        runner = threading.Thread(
            target=lambda: results.extend(
                run_threads(
                    [lambda c=c, k=k: _rounds(c, k, target, progress) for k, c in enumerate(comms)],
                    timeout_s=140,
                )
            ),
            daemon=True,
        )
        runner.start()
        killed = 0
        for message, index in KILL_POINTS * 2:
            master = Peer(_serve_master, port, message, index)
            master.process.join(30)
            assert master.process.exitcode == KILLED_EXIT_CODE, (message, index)  # it fired
            killed += 1
        master = Peer(_serve_master, port, None, 0)
        time.sleep(1.0)
        # Every peer runs to the same round count, a little past the furthest one.
        target[0] = max(progress) + 2
        runner.join(60)
        assert killed == 2 * len(KILL_POINTS)
        assert len(results) == NUM_PEERS, results
        for res in results:
            assert not isinstance(res, BaseException), res
        longest = target[0]
        first = results[0]
        assert first["applied"] == list(range(longest)) and longest >= 3
        for res in results:
            assert res["mixed"] == [], f"rounds applied by some peers only: {res['mixed']}"
            assert res["applied"] == first["applied"], "a round applied twice or by some only"
            assert res["revision"] == first["revision"]
            assert torch.equal(res["state"], first["state"])
    finally:
        for c in comms:
            c.close(timeout_s=1.0)
        master.kill()


@pytest.mark.timeout(60)
def test_the_commit_fault_point_fires_at_each_vote_and_each_verdict() -> None:
    faults = FaultInjector()
    faults.inject("master.commit", call=lambda ctx: None, times=None)
    master = start_master(faults=faults)
    try:
        host, port = master.address
        comms = connect_all(f"{host}:{port}", 2)
        xs = [torch.ones(4), torch.ones(4)]
        run_threads(
            [
                lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=20)
                for c, x in zip(comms, xs, strict=True)
            ]
        )
        assert torch.equal(xs[0], torch.full((4,), 2.0))
        # Two votes received and two verdicts sent, each counted once per peer.
        assert faults.fired("master.commit") == 4
        for c in comms:
            c.close()
    finally:
        master.stop()
