"""lowcomm.init() and replica admission: torchrun-style replicas join as one unit, leave as one, and
no all-reduce averages peers at different outer states."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lowcomm.comm import (
    CommConfig,
    CommTimeoutError,
    Communicator,
    Master,
    StaleStateError,
    TopologyError,
)
from lowcomm.diloco import DiLoCo, OuterConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKEN = "0123456789abcdef0123456789abcdef"  # 128 bits
FAST = CommConfig(timeout_s=20.0, poll_s=0.2, num_connections=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _master(heartbeat_timeout_s: float = 5.0) -> tuple[Master, str]:
    master = Master(("127.0.0.1", 0), token=TOKEN.encode(), heartbeat_timeout_s=heartbeat_timeout_s)
    master.start()
    return master, "{}:{}".format(*master.address)


def _rank_env(address: str, replica: str, rank: int, size: int, port: int, **extra: str) -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_WORLD_SIZE=str(size),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOWCOMM_MASTER=address,
        LOWCOMM_TOKEN=TOKEN,
        LOWCOMM_REPLICA_ID=replica,
        LOWCOMM_LISTEN_HOST="127.0.0.1",
        LOWCOMM_TIMEOUT_S="30",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        **extra,
    )


def _threads(fns: list[Callable[[], Any]], timeout_s: float = 60.0) -> list[Any]:
    results: list[Any] = [None] * len(fns)

    def wrap(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a peer thread hung"
    return results


def _rank(
    address: str, replica: str, rank: int, size: int = 2, group: int | None = None
) -> Communicator:
    return Communicator(
        address,
        peer_group=rank if group is None else group,
        token=TOKEN,
        config=FAST,
        replica_id=replica,
        replica_rank=rank,
        num_replica_ranks=size,
    )


# ------------------------------------------------------------------ the README-style script
@pytest.mark.timeout(180)
def test_readme_style_script_two_replicas_of_two_ranks_start_and_train_with_a_late_rank() -> None:
    # Replica "b"'s rank 1 reaches lowcomm.init() 3 s after its partner: the partner must not be
    # admitted alone (it would block in FSDP); every rank trains and the shard groups agree.
    master, address = _master()
    try:
        procs = []
        for replica, delays in (("a", (0, 0)), ("b", (0, 3))):
            port = _free_port()
            for rank in range(2):
                env = _rank_env(
                    address, replica, rank, 2, port,
                    LOWCOMM_MIN_REPLICAS="2", LOWCOMM_TEST_DELAY_S=str(delays[rank]),
                )  # fmt: skip
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(HERE / "_replica_script.py")],
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
        results = {}
        for p in procs:
            out, _ = p.communicate(timeout=150)
            assert p.returncode == 0, out[-3000:]
            line = next(s for s in out.splitlines() if s.startswith("RESULT "))
            r = json.loads(line.removeprefix("RESULT "))
            results[(r["replica"], r["shard"])] = r
    finally:
        master.stop()
    late = results[("b", 1)]
    partner = results[("b", 0)]
    assert late["arrived"] - partner["arrived"] > 2.5  # the delay really happened
    assert partner["accepted"] >= late["arrived"]  # not admitted before its partner arrived
    assert all(r["num_replicas"] == 2 and r["outer_steps"] == 3 for r in results.values())
    assert results[("a", 0)]["hash"] == results[("b", 0)]["hash"]
    assert results[("a", 1)]["hash"] == results[("b", 1)]["hash"]
    assert results[("a", 0)]["hash"] != results[("a", 1)]["hash"]


# ------------------------------------------------------------------ admission as a unit
@pytest.mark.timeout(60)
def test_a_replica_is_admitted_only_once_all_its_ranks_are_in() -> None:
    master, address = _master()
    a0, a1 = _rank(address, "a", 0), _rank(address, "a", 1)
    b0, b1 = _rank(address, "b", 0), _rank(address, "b", 1)
    try:
        # The first replica of an empty run: accepted only when its second rank registers.
        assert _threads([lambda: a0.connect(timeout_s=20), lambda: a1.connect(timeout_s=20)]) == [
            None,
            None,
        ]
        assert a0.replicas == {"a": [0, 1]}
        seen: dict[str, Any] = {}

        def running(c: Communicator) -> None:
            # The running replica keeps calling update_topology() (as init() does).
            while len(c.replicas) < 2:
                c.update_topology(timeout_s=20)
                if len(c.replicas) < 2 and c.pending_replicas:
                    seen.setdefault("pending", c.pending_replicas)
                    time.sleep(0.1)

        def late() -> None:
            time.sleep(2.0)
            seen["b0_still_pending"] = b0.peer_id in master.snapshot()["pending"]
            seen["b1_arrived"] = time.monotonic()
            b1.connect(timeout_s=20)

        def early() -> None:
            b0.connect(timeout_s=20)
            seen["b0_accepted"] = time.monotonic()

        results = _threads([lambda: running(a0), lambda: running(a1), early, late])
        assert results == [None] * 4, results
        assert seen["b0_still_pending"] and seen["b0_accepted"] >= seen["b1_arrived"]
        assert seen["pending"] == {"b": {"num_ranks": 2, "ranks": [0]}}
        assert b0.replicas == a0.replicas == {"a": [0, 1], "b": [0, 1]}
    finally:
        for c in (a0, a1, b0, b1):
            c.close()
        master.stop()


@pytest.mark.timeout(60)
def test_a_half_replica_times_out_naming_its_missing_rank() -> None:
    master, address = _master()
    b0 = _rank(address, "b", 0)
    try:
        t0 = time.monotonic()
        with pytest.raises(
            CommTimeoutError, match=r"replica 'b' has 1 of 2 ranks.*missing ranks \[1\]"
        ):
            b0.connect(timeout_s=2)
        assert time.monotonic() - t0 < 6
        assert master.snapshot()["accepted"] == []  # never let in alone, even into an empty run
    finally:
        b0.close()
        master.stop()


@pytest.mark.timeout(60)
def test_init_waits_for_min_replicas_and_names_who_is_missing() -> None:
    # A replica of one process (no torchrun) calls lowcomm.init(min_replicas=2); replica "b" has
    # only rank 0 of 2 registered: init() raises naming b's missing rank.
    master, address = _master()
    b0 = _rank(address, "b", 0)
    try:
        pending = threading.Thread(target=lambda: _swallow(lambda: b0.connect(timeout_s=8)))
        pending.start()
        env = {
            "LOWCOMM_MASTER": address,
            "LOWCOMM_TOKEN": TOKEN,
            "LOWCOMM_LISTEN_HOST": "127.0.0.1",
        }
        t0 = time.monotonic()
        code = (
            "import lowcomm, sys\n"
            "try:\n"
            "    lowcomm.init(replica_id='solo', min_replicas=2, join_timeout_s=3)\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e); sys.exit(3)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 3, out.stdout + out.stderr
        assert "CommTimeoutError only 1 of min_replicas=2" in out.stdout
        assert "'solo' (1 ranks)" in out.stdout
        assert "pending: 'b' has ranks [0] of 2 (missing ranks [1]" in out.stdout
        assert time.monotonic() - t0 < 30
        pending.join(20)
    finally:
        b0.close()
        master.stop()


def _swallow(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        fn()


# ------------------------------------------------------------------ leaving as a whole
@pytest.mark.timeout(60)
def test_a_replica_that_loses_a_rank_leaves_as_a_whole() -> None:
    master, address = _master(heartbeat_timeout_s=3.0)
    a0, a1 = _rank(address, "a", 0), _rank(address, "a", 1)
    b0, b1 = _rank(address, "b", 0), _rank(address, "b", 1)
    try:
        _threads([lambda c=c: c.connect(timeout_s=20) for c in (a0, a1)])
        _threads(
            [lambda c=c: _until_replicas(c, 2) for c in (a0, a1)]
            + [lambda c=c: c.connect(timeout_s=20) for c in (b0, b1)]
        )
        assert a0.replicas == {"a": [0, 1], "b": [0, 1]}
        lost = b1.peer_id
        master.evict(lost, "its session connection closed (process died?)")  # as a death does
        evicted = master.snapshot()["evicted"]
        assert lost in evicted and b0.peer_id in evicted
        assert f"rank 1 (peer {lost}) of replica 'b'" in evicted[b0.peer_id]
        with pytest.raises(TopologyError, match=f"rank 1 \\(peer {lost}\\) of replica 'b'"):
            b0.all_reduce(torch.ones(4), timeout_s=10)
        # The other replica goes on, shard group by shard group, among itself.
        t = [torch.full((4,), float(i)) for i in range(2)]
        _threads(
            [lambda: a0.all_reduce(t[0], timeout_s=10), lambda: a1.all_reduce(t[1], timeout_s=10)]
        )
        assert a0.replicas == {"a": [0, 1]}
    finally:
        for c in (a0, a1, b0, b1):
            c.close()
        master.stop()


def _until_replicas(c: Communicator, n: int) -> None:
    while len(c.replicas) < n:
        c.update_topology(timeout_s=20)


# ------------------------------------------------------------------ the outer-state check
@pytest.mark.timeout(60)
def test_all_reduce_between_peers_at_different_outer_steps_is_refused_on_every_peer() -> None:
    master, address = _master()
    peers = [Communicator(address, token=TOKEN, config=FAST) for _ in range(2)]
    try:
        peers[0].connect(timeout_s=10)
        _threads([lambda: peers[1].connect(timeout_s=20), lambda: _until_world(peers[0], 2)])
        stamps = [{"outer_step": 25, "revision": 3}, {"outer_step": 13, "revision": 2}]
        tensors = [torch.full((8,), 1.0), torch.full((8,), 3.0)]
        results = _threads(
            [
                lambda i=i: peers[i].all_reduce(tensors[i], stamp=stamps[i], timeout_s=10)
                for i in range(2)
            ]
        )
        for i, exc in enumerate(results):
            assert isinstance(exc, StaleStateError), results
            assert "'outer_step': 25" in str(exc) and "'outer_step': 13" in str(exc)
            assert exc.is_behind == (i == 1)
        assert torch.equal(tensors[0], torch.full((8,), 1.0))  # nothing was averaged
        assert torch.equal(tensors[1], torch.full((8,), 3.0))
        # Equal stamps average as usual.
        same = {"outer_step": 25, "revision": 3}
        _threads(
            [
                lambda i=i: peers[i].all_reduce(tensors[i], stamp=same, timeout_s=10)
                for i in range(2)
            ]
        )
        assert torch.equal(tensors[0], torch.full((8,), 2.0))
    finally:
        for c in peers:
            c.close()
        master.stop()


def _until_world(c: Communicator, n: int) -> None:
    while c.world_size < n:
        c.update_topology(timeout_s=20)


@pytest.mark.timeout(90)
def test_a_peer_that_rolled_its_outer_state_back_is_refused_then_resynced() -> None:
    # Issue 16 item 3: a peer loads an old checkpoint of its outer state (outer step 1 while the
    # run is at 2). Its next outer all-reduce is refused on both peers; it takes the run's state
    # (receive_only) instead of averaging, and both end bit-identical.
    master, address = _master()
    peers = [Communicator(address, token=TOKEN, config=FAST) for _ in range(2)]
    try:
        peers[0].connect(timeout_s=10)
        _threads([lambda: peers[1].connect(timeout_s=20), lambda: _until_world(peers[0], 2)])
        out: dict[int, Any] = {}

        def train(i: int) -> None:
            torch.manual_seed(0)
            model = nn.Linear(4, 2)
            inner = torch.optim.SGD(model.parameters(), lr=0.1)
            trainer = DiLoCo(
                model,
                inner,
                peers[i],
                config=OuterConfig(method="diloco", sync_every=2, timeout_s=20),
            )
            gen = torch.Generator().manual_seed(i)

            def steps(n: int) -> None:
                for _ in range(n):
                    model(torch.randn(3, 4, generator=gen)).pow(2).sum().backward()
                    trainer.step()

            steps(2)
            old = trainer.state_dict()  # outer step 1
            steps(2)  # outer step 2
            before = trainer.outer_params.clone()
            if i == 1:
                trainer.load_state_dict(old)  # rolled back, as a bad resume does
            out[i, "stamp"] = {"outer_step": trainer.stats.outer_steps}
            steps(2)  # this round's all-reduce is refused on both; peer 1 resyncs
            out[i] = (
                trainer.outer_params.clone(),
                trainer.stats.stale_resyncs,
                trainer.stats.outer_steps,
                before,
            )

        assert _threads([lambda: train(0), lambda: train(1)]) == [None, None]
    finally:
        for c in peers:
            c.close()
        master.stop()
    assert out[0, "stamp"]["outer_step"] == 2 and out[1, "stamp"]["outer_step"] == 1
    (h0, r0, s0, before0), (h1, r1, s1, _) = out[0], out[1]
    assert r0 == r1 == 1  # refused once, on every peer
    assert s0 == s1 == 2  # nobody averaged into the stale round; the run was not rolled back
    assert torch.equal(h0, h1) and torch.equal(h0, before0)  # peer 1 took the run's state


# ------------------------------------------------------------------ configuration
def test_run_config_reads_arguments_then_environment_then_defaults(tmp_path: Path) -> None:
    from lowcomm import RunConfig

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {
        "LOWCOMM_MASTER": "10.0.0.1:48000",
        "LOWCOMM_TOKEN_FILE": str(token_file),
        "LOWCOMM_MIN_REPLICAS": "3",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29500",
    }
    cfg = RunConfig.from_env(env, min_replicas=2)
    assert (cfg.master, cfg.token, cfg.min_replicas) == ("10.0.0.1:48000", TOKEN, 2)
    assert (cfg.shard_index, cfg.num_shards, cfg.replica_id) == (1, 2, "10.0.0.7:29500")
    assert cfg.timeout_s == 60.0 and TOKEN not in repr(cfg)
    assert RunConfig.from_env({**env, "TORCHELASTIC_RUN_ID": "job7"}).replica_id == "job7"
    with pytest.raises(ValueError, match=r"RunConfig.min_replicas \(LOWCOMM_MIN_REPLICAS\)"):
        RunConfig.from_env({**env, "LOWCOMM_MIN_REPLICAS": "0"})
    with pytest.raises(ValueError, match=r"LOWCOMM_JOIN_TIMEOUT_S.*'soon'"):
        RunConfig.from_env({**env, "LOWCOMM_JOIN_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match=r"RunConfig.shard_index \(RANK\) must be in \[0, 2\)"):
        RunConfig.from_env({**env, "RANK": "2"})
    with pytest.raises(ValueError, match=r"LOWCOMM_MASTER.*is not set"):
        RunConfig.from_env({})
    with pytest.raises(ValueError, match=r"cannot read the token file.*lowcomm token new"):
        RunConfig.from_env({**env, "LOWCOMM_TOKEN_FILE": str(tmp_path / "missing")})
