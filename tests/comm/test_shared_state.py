"""Shared state: hashes, strategies, a stale joiner brought bit-identical, striping, source failover."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from _control_harness import TOKEN, Peer, addr, communicator, connect_all, run_threads, start_master

from lowcomm.comm import CommConfig, Communicator, SharedState, SyncInfo, shared_state
from lowcomm.comm.errors import TopologyError
from lowcomm.faults import KILLED_EXIT_CODE, FaultInjector


def _state(seed: int, revision: int, *, rows: int = 300) -> SharedState:
    gen = torch.Generator().manual_seed(seed)
    return SharedState(
        {
            "w": torch.randn(rows, 70, generator=gen),
            "b": torch.randn(5, generator=gen).to(torch.bfloat16),
            "step": torch.tensor([float(revision)]),
        },
        revision=revision,
    )


def test_tensor_hash_sees_every_bit_dtype_and_shape() -> None:
    x = torch.randn(100)
    y = x.clone()
    assert shared_state.tensor_hash(x) == shared_state.tensor_hash(y)
    y.view(torch.int32)[7] ^= 1  # one flipped bit
    assert shared_state.tensor_hash(x) != shared_state.tensor_hash(y)
    assert shared_state.tensor_hash(x) != shared_state.tensor_hash(x.view(10, 10))
    assert shared_state.tensor_hash(x) != shared_state.tensor_hash(x.double())
    with pytest.raises(ValueError, match="revision"):
        SharedState({}, revision=-1)


@pytest.mark.timeout(90)
def test_a_peer_joining_with_stale_state_receives_only_the_differing_tensors(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(shared_state, "_CHUNK_BYTES", 4096)  # many chunks: real striping
    master = start_master()
    try:
        comms = connect_all(addr(master), 3)
        # 4 MB in 4 KiB chunks: long enough that every source's (encrypted) handshake is done
        # before the first source alone could have served it all, even on a loaded host.
        states = [_state(0, 5, rows=15_000) for _ in range(3)]
        stale = _state(1, 0, rows=15_000)
        stale.tensors["step"].copy_(states[0].tensors["step"])  # one tensor already right
        stale.tensors["step"][0] = 5.0
        before = stale.hashes()
        assert before["w"] != states[0].hashes()["w"]  # it really differed
        joiner = communicator(addr(master))

        def running(i: int) -> SyncInfo:
            comms[i].update_topology(timeout_s=30)
            return comms[i].sync_shared_state(states[i], timeout_s=30)

        def joining() -> SyncInfo:
            joiner.connect(timeout_s=30)
            return joiner.sync_shared_state(stale, timeout_s=30)

        def go() -> list[Any]:
            time.sleep(0.3)
            return run_threads([lambda: running(0), lambda: running(1), lambda: running(2)])

        res = run_threads([go, joining])
        infos, jinfo = res[0], res[1]
        assert all(isinstance(i, SyncInfo) for i in infos), infos
        assert isinstance(jinfo, SyncInfo), jinfo
        hashes = [s.hashes() for s in [*states, stale]]
        assert all(h == hashes[0] for h in hashes), "not bit-identical after the sync"
        assert stale.revision == 5
        assert jinfo.received == ["b", "w"]  # "step" matched already: not sent
        assert jinfo.num_sources >= 2, "the transfer was not striped over several sources"
        assert jinfo.rx_bytes == 15_000 * 70 * 4 + 5 * 2
        assert sum(i.tx_bytes for i in infos) == jinfo.rx_bytes
        for c in [*comms, joiner]:
            c.close()
    finally:
        master.stop()


@pytest.mark.timeout(60)
def test_strategies_popular_wins_send_only_overrides_receive_only_never_votes() -> None:
    master = start_master()
    try:
        a, b, c = connect_all(addr(master), 3)
        sa, sb, sc = _state(0, 1), _state(0, 1), _state(2, 9)
        run_threads(
            [
                lambda: a.sync_shared_state(sa),
                lambda: b.sync_shared_state(sb),
                lambda: c.sync_shared_state(sc),
            ]
        )
        assert sc.hashes() == sa.hashes() and sc.revision == 1  # 2 votes beat 1 higher revision
        # send_only wins even when outnumbered.
        sa2, sb2, sc2 = _state(0, 1), _state(0, 1), _state(3, 2)
        run_threads(
            [
                lambda: a.sync_shared_state(sa2),
                lambda: b.sync_shared_state(sb2),
                lambda: c.sync_shared_state(sc2, "send_only"),
            ]
        )
        assert sa2.hashes() == sb2.hashes() == sc2.hashes() == _state(3, 2).hashes()
        # receive_only peers do not vote; if everyone is receive_only nobody can provide it.
        sa3, sb3, sc3 = _state(4, 1), _state(4, 1), _state(5, 1)
        run_threads(
            [
                lambda: a.sync_shared_state(sa3, "receive_only"),
                lambda: b.sync_shared_state(sb3, "receive_only"),
                lambda: c.sync_shared_state(sc3),
            ]
        )
        assert sa3.hashes() == sc3.hashes() == _state(5, 1).hashes()
        res = run_threads(
            [
                lambda x=x: x.sync_shared_state(_state(0, 0), "receive_only", timeout_s=10)
                for x in (a, b, c)
            ]
        )
        assert all(isinstance(r, TopologyError) and "receive_only" in str(r) for r in res), res
        with pytest.raises(ValueError, match="strategy"):
            a.sync_shared_state(sa, "popular")
        for x in (a, b, c):
            x.close()
    finally:
        master.stop()


def _peer(master_address: str, seed: int, n: int, exit_after_chunks: int | None) -> dict[str, Any]:
    shared_state._CHUNK_BYTES = 16 * 1024
    faults = FaultInjector()
    if exit_after_chunks is not None:
        # Serve that many chunks, then die before the next one (a source lost mid-transfer).
        faults.inject("state.serve", kill=True, after=exit_after_chunks)
    config = CommConfig(timeout_s=30.0, poll_s=0.2, num_connections=1, faults=faults)
    c = Communicator(master_address, token=TOKEN, config=config)
    c.connect(timeout_s=60)
    while c.world_size < n:
        c.update_topology(timeout_s=60)
    gen = torch.Generator().manual_seed(seed)
    state = SharedState({"w": torch.randn(1 << 20, generator=gen)}, revision=3 if seed == 0 else 0)
    before = state.state_hash()
    info = c.sync_shared_state(state, timeout_s=60)
    out = {
        "before": before,
        "after": state.state_hash(),
        "received": info.received,
        "sources": info.num_sources,
    }
    c.close()
    return out


@pytest.mark.timeout(120)
def test_a_source_dying_mid_transfer_is_replaced_by_the_others() -> None:
    master = start_master(heartbeat_timeout_s=3.0)
    try:
        # Three up-to-date sources; one exits after serving 5 chunks; the fourth peer is stale.
        peers = [
            Peer(_peer, addr(master), 0, 4, None),
            Peer(_peer, addr(master), 0, 4, 5),
            Peer(_peer, addr(master), 0, 4, None),
            Peer(_peer, addr(master), 1, 4, None),
        ]
        results = [peers[i].result(timeout_s=100) for i in (0, 2, 3)]
        peers[1].process.join(10)
        assert peers[1].process.exitcode == KILLED_EXIT_CODE  # the fault fired mid-transfer
        stale = results[2]
        assert stale["before"] != results[0]["before"]
        assert stale["after"] == results[0]["after"] == results[1]["after"]
        assert stale["received"] == ["w"]
        assert stale["sources"] >= 2
    finally:
        master.stop()


@pytest.mark.timeout(60)
def test_a_state_with_names_the_others_lack_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    master = start_master()
    try:
        a, b = connect_all(addr(master), 2)
        sa = _state(0, 1)
        sb = _state(1, 0)
        sb.tensors["extra"] = torch.zeros(2)
        res = run_threads(
            [
                lambda: a.sync_shared_state(sa, timeout_s=20),
                lambda: b.sync_shared_state(sb, timeout_s=20),
            ]
        )
        assert isinstance(res[1], TopologyError) and "extra" in str(res[1]), res
        assert isinstance(res[0], SyncInfo)
        for x in (a, b):
            x.close()
    finally:
        master.stop()
