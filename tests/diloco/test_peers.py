"""DiLoCo over the real communicator: peer processes on loopback, a peer killed, a peer joining."""

from __future__ import annotations

import queue
import time
from dataclasses import replace
from typing import Any

import pytest
import torch

from lowcomm.comm import Master
from lowcomm.diloco import OuterConfig
from lowcomm.faults import KILLED_EXIT_CODE
from lowcomm.launch.local_run import peer_context
from lowcomm.launch.peer import PeerSpec, kill_at_inner_step, run_peer
from lowcomm.launch.tinygpt import GPT as GPTModel
from lowcomm.launch.tinygpt import GPTConfig
from tests._tokens import TOKEN

GPT = GPTConfig(num_layers=1, width=32, num_heads=2, context=32)


def _spec(master: Master, index: int, **kw: Any) -> PeerSpec:
    base: dict[str, Any] = dict(
        master="{}:{}".format(*master.address),
        token=TOKEN,
        index=index,
        num_peers=3,
        outer=OuterConfig(method="async", sync_every=5, timeout_s=30.0),
        gpt=GPT,
        batch_size=8,
        outer_steps=8,
        corpus_bytes=300_000,
        report_every=5,
        timeout_s=30.0,
    )
    base.update(kw)
    return PeerSpec(**base)


class _Run:
    def __init__(self) -> None:
        self.ctx = peer_context()
        self.events: Any = self.ctx.Queue()
        self.procs: list[Any] = []
        self.done: dict[int, dict[str, Any]] = {}
        self.progress: dict[int, dict[str, Any]] = {}
        self.snapshots: list[tuple[int, dict[str, Any]]] = []

    def start(self, spec: PeerSpec) -> Any:
        proc = self.ctx.Process(target=run_peer, args=(spec, self.events), daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def pump(self, until: Any, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, f"timed out; finished: {sorted(self.done)}"
            try:
                kind, index, payload = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            assert kind != "error", f"peer {index} failed:\n{payload}"
            assert kind != "late", f"peer {index} joined after the others had finished"
            if kind == "done":
                self.done[index] = payload
            elif kind == "progress":
                self.progress[index] = payload
            elif kind == "snapshot":
                self.snapshots.append((index, payload))

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


@pytest.mark.timeout(180)
def test_peer_killed_mid_run_the_survivors_continue_with_bit_identical_outer_params() -> None:
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=5.0).start()
    run = _Run()
    try:
        procs = [
            run.start(_spec(master, i, faults=(kill_at_inner_step(17),) if i == 2 else ()))
            for i in range(3)
        ]
        run.pump(lambda: len(run.done) == 2, timeout_s=150)
        procs[2].join(timeout=10)
        assert procs[2].exitcode == KILLED_EXIT_CODE  # the injected death really happened
        a, b = run.done[0], run.done[1]
        assert a["hash"] == b["hash"]
        assert a["world_size"] == b["world_size"] == 2
        assert a["outer_steps"] == b["outer_steps"] >= 8
    finally:
        run.close()
        master.stop()


@pytest.mark.timeout(180)
def test_peer_joining_mid_run_receives_the_outer_state_and_ends_bit_identical() -> None:
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=5.0).start()
    run = _Run()
    try:
        first = [
            _spec(master, i, num_peers=2, outer_steps=12, min_final_world=3, max_outer_steps=1000)
            for i in range(2)
        ]
        for spec in first:
            run.start(spec)
        # Join once the others are a few outer steps in.
        run.pump(lambda: run.progress.get(0, {}).get("outer_steps", 0) >= 3, timeout_s=120)
        run.start(replace(first[0], index=2, joining=True))
        run.pump(lambda: len(run.done) == 3, timeout_s=150)
        hashes = {r["hash"] for r in run.done.values()}
        assert len(hashes) == 1, run.done
        assert all(r["world_size"] == 3 for r in run.done.values())
        assert run.done[0]["joins"] == run.done[1]["joins"] == 1
        assert run.done[2]["rx_bytes"] > 0  # the joiner really received the state
        assert run.done[2]["inner_steps"] < run.done[0]["inner_steps"]
        assert run.done[0]["outer_steps"] < 1000  # stopped because the joiner came, not the cap
    finally:
        run.close()
        master.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["diloco", "ddp"])
def test_peer_zero_snapshots_what_it_would_ship_on_its_training_clock(mode: str) -> None:
    # The benchmark's time to target evaluates these: one per outer step and one at the end
    # (ddp: every snapshot_every steps), from peer 0 only, with the training seconds so far.
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=5.0).start()
    run = _Run()
    try:
        for i in range(2):
            run.start(
                _spec(
                    master,
                    i,
                    num_peers=2,
                    mode=mode,
                    outer=OuterConfig(sync_every=5, timeout_s=30.0),
                    outer_steps=3,
                    max_steps=9,
                    snapshots=True,
                    snapshot_every=3,
                )
            )
        run.pump(lambda: len(run.done) == 2, timeout_s=100)
        assert {index for index, _ in run.snapshots} == {0}
        snaps = [s for _, s in run.snapshots]
        assert [s["step"] for s in snaps] == ([5, 10, 15, 15] if mode == "diloco" else [3, 6, 9])
        seconds = [s["seconds"] for s in snaps]
        assert seconds == sorted(seconds) and seconds[0] > 0
        # Two clocks read in turn: the last snapshot's may lead the wall clock by microseconds.
        assert seconds[-1] <= run.done[0]["wall_s"] + 1e-3
        numel = sum(p.numel() for p in GPTModel(GPT).parameters())
        assert all(s["params"].shape == (numel,) for s in snaps)
        # The last snapshot is what the run ends with: the outer parameters every peer agrees on.
        last = torch.from_numpy(snaps[-1]["params"])
        assert not torch.equal(last, torch.from_numpy(snaps[0]["params"]))
        assert run.done[0]["hash"] == run.done[1]["hash"]
        for r in run.done.values():
            assert 0 < r["steady_s"] <= r["wall_s"] and 0 <= r["steady_wait_s"] <= r["comm_wait_s"]
    finally:
        run.close()
        master.stop()
