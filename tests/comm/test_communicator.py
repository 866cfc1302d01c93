"""Communicator: phases, all-reduce through the master's gates, async ops, peer groups, p2p, joins."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _control_harness import FAST, addr, communicator, connect_all, run_threads, start_master

from lowcomm.comm import AllReduceInfo, CommBackend, Communicator, open_communicator
from lowcomm.comm.errors import TopologyError
from lowcomm.compression import Codec, get_codec
from lowcomm.faults import FaultInjector
from tests._tokens import TOKEN


@pytest.fixture
def master():  # type: ignore[no-untyped-def]
    m = start_master()
    yield m
    m.stop()


def _close(comms: list[Communicator]) -> None:
    for c in comms:
        c.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_reduce_matches_a_reference_for_every_op(master, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    comms = connect_all(addr(master), 3)
    gen = torch.Generator().manual_seed(0)
    for op in ("sum", "avg", "min", "max"):
        for numel in (1, 2, 1001):  # smaller than the peer count, odd sizes
            xs = [torch.randn(numel, generator=gen).to(dtype) for _ in comms]
            stacked = torch.stack([x.float() for x in xs])
            ref = {
                "sum": stacked.sum(0),
                "avg": stacked.mean(0),
                "min": stacked.min(0).values,
                "max": stacked.max(0).values,
            }[op]
            outs = [torch.empty_like(x) for x in xs]
            infos = run_threads(
                [
                    lambda c=c, x=x, o=o, op=op: c.all_reduce(x, op, out=o, timeout_s=30)
                    for c, x, o in zip(comms, xs, outs, strict=True)
                ]
            )
            assert all(isinstance(i, AllReduceInfo) and i.world_size == 3 for i in infos), infos
            for o in outs:
                assert torch.equal(o, outs[0]), "peers disagree bit for bit"
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(outs[0].float(), ref.to(dtype).float(), atol=tol, rtol=tol)
    _close(comms)


@pytest.mark.timeout(90)
def test_quantized_all_reduce_is_bit_identical_on_every_peer(master) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("lowcomm.compression").get_codec  # noqa: B018
    comms = connect_all(addr(master), 3)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(10_000, generator=gen) for _ in comms]
    ref = torch.stack(xs).sum(0)
    run_threads(
        [
            lambda c=c, x=x: c.all_reduce(x, "sum", quantization="uint8", timeout_s=30)
            for c, x in zip(comms, xs, strict=True)
        ]
    )
    assert all(torch.equal(x, xs[0]) for x in xs)
    assert not torch.equal(xs[0], ref)  # it really was quantized ...
    assert (xs[0] - ref).abs().max() < 0.2  # ... and close to the exact sum
    _close(comms)


@pytest.mark.timeout(90)
def test_several_async_all_reduces_in_flight_are_told_apart_by_tag(master) -> None:  # type: ignore[no-untyped-def]
    comms = connect_all(addr(master), 2)
    tensors = [[torch.full((500,), float(10 * r + k)) for k in range(4)] for r in range(2)]

    def peer(r: int) -> list[AllReduceInfo]:
        handles = [
            comms[r].all_reduce_async(t, "sum", tag=k, timeout_s=30)
            for k, t in enumerate(tensors[r])
        ]
        return [h.wait() for h in handles]

    results = run_threads([lambda: peer(0), lambda: peer(1)])
    assert all(isinstance(r, list) for r in results), results
    for k in range(4):
        expected = float(k + (10 + k))
        assert torch.equal(tensors[0][k], torch.full((500,), expected))
        assert torch.equal(tensors[1][k], torch.full((500,), expected))
    _close(comms)


@pytest.mark.timeout(90)
def test_mismatched_tags_or_sizes_raise_instead_of_mixing_buffers(master) -> None:  # type: ignore[no-untyped-def]
    comms = connect_all(addr(master), 2)
    a, b = torch.ones(10), torch.ones(10)
    res = run_threads(
        [
            lambda: comms[0].all_reduce(a, "sum", tag=1, timeout_s=10),
            lambda: comms[1].all_reduce(b, "sum", tag=2, timeout_s=10),
        ]
    )
    assert all(isinstance(r, TopologyError) and "lockstep" in str(r) for r in res), res
    c, d = torch.ones(10), torch.ones(11)
    res = run_threads(
        [
            lambda: comms[0].all_reduce(c, "sum", timeout_s=10),
            lambda: comms[1].all_reduce(d, "sum", timeout_s=10),
        ]
    )
    assert all(isinstance(r, TopologyError) and "disagree" in str(r) for r in res), res
    assert torch.equal(a, torch.ones(10)) and torch.equal(d, torch.ones(11))
    # Both can carry on afterwards.
    run_threads(
        [
            lambda: comms[0].all_reduce(a, "sum", timeout_s=10),
            lambda: comms[1].all_reduce(b, "sum", timeout_s=10),
        ]
    )
    assert torch.equal(a, torch.full((10,), 2.0))
    _close(comms)


@pytest.mark.timeout(90)
def test_are_peers_pending_gives_every_peer_the_same_answer_and_a_joiner_is_admitted_mid_run(
    master,
) -> None:  # type: ignore[no-untyped-def]
    comms = connect_all(addr(master), 2)
    joiner = communicator(addr(master))
    sums: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def running(r: int) -> None:
        c = comms[r]
        deadline = time.monotonic() + 60
        while sums[r].count(3.0) < 3 and time.monotonic() < deadline:
            if c.are_peers_pending(timeout_s=20):
                c.update_topology(timeout_s=20)
            x = torch.ones(100)
            c.all_reduce(x, "sum", timeout_s=20)
            sums[r].append(float(x[0]))

    def joining() -> None:
        time.sleep(0.5)
        joiner.connect(timeout_s=30)
        # connect() returns where update_topology() returned on the others: all_reduce is next.
        while True:
            x = torch.ones(100)
            joiner.all_reduce(x, "sum", timeout_s=20)
            sums[2].append(float(x[0]))
            if sums[2].count(3.0) == 3:
                return
            if joiner.are_peers_pending(timeout_s=20):
                joiner.update_topology(timeout_s=20)

    res = run_threads([lambda: running(0), lambda: running(1), joining], timeout_s=80)
    assert res == [None, None, None], res
    assert sums[0][0] == 2.0 and sums[0][-1] == 3.0  # world grew from 2 to 3 mid-run
    assert sums[0] == sums[1]
    assert set(sums[2]) == {3.0}
    assert joiner.world_size == 3
    _close([*comms, joiner])


@pytest.mark.timeout(90)
def test_peer_groups_reduce_only_among_themselves(master) -> None:  # type: ignore[no-untyped-def]
    comms = connect_all(addr(master), 4, groups=[0, 1, 0, 1])
    assert [c.world_size for c in comms] == [4] * 4
    assert [c.peer_group_world_size for c in comms] == [2] * 4
    assert sorted(c.rank for c in comms) == [0, 0, 1, 1]
    xs = [torch.full((64,), float(i + 1)) for i in range(4)]
    infos = run_threads(
        [
            lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=30)
            for c, x in zip(comms, xs, strict=True)
        ]
    )
    assert [i.world_size for i in infos] == [2] * 4
    assert [float(x[0]) for x in xs] == [4.0, 6.0, 4.0, 6.0]
    _close(comms)


@pytest.mark.timeout(120)
def test_async_sends_of_one_peer_and_tag_arrive_in_the_order_they_were_started(master) -> None:  # type: ignore[no-untyped-def]
    # More sends in flight than the point-to-point pool has threads: each thread reached the
    # key's lock in any order, and a lock is not first come first served, so messages of one
    # key could overtake each other (the pipeline runtime's four micro-batches did).
    a, b = connect_all(addr(master), 2)
    try:
        for _ in range(5):
            handles = [
                a.send_async(torch.full((64,), float(i)), to=b.peer_id, tag=3, timeout_s=30)
                for i in range(16)
            ]
            got = []
            for _ in handles:
                out = torch.empty(64)
                b.recv(out, from_=a.peer_id, tag=3, timeout_s=30)
                got.append(int(out[0].item()))
            for h in handles:
                h.wait()
            assert got == list(range(16))
    finally:  # left open, their sessions would reconnect to the stopped master for the rest of the run
        _close([a, b])


@pytest.mark.timeout(60)
def test_send_and_recv_move_a_tensor_between_accepted_peers(master) -> None:  # type: ignore[no-untyped-def]
    a, b = connect_all(addr(master), 2)
    x = torch.randn(3, 1000).to(torch.bfloat16)
    out = torch.zeros(3, 1000, dtype=torch.bfloat16)
    res = run_threads(
        [
            lambda: a.send(x, to=b.peer_id, tag=7, timeout_s=20),
            lambda: b.recv(out, from_=a.peer_id, tag=7, timeout_s=20),
        ]
    )
    assert res[0] is None and res[1] is out
    assert torch.equal(out, x)
    # A shape mismatch is refused on both sides, nothing written.
    wrong = torch.zeros(5)
    res = run_threads(
        [
            lambda: a.send(x, to=b.peer_id, timeout_s=10),
            lambda: b.recv(wrong, from_=a.peer_id, timeout_s=10),
        ]
    )
    assert isinstance(res[1], ValueError) and "expects" in str(res[1])
    assert isinstance(res[0], Exception)
    assert torch.equal(wrong, torch.zeros(5))
    with pytest.raises(TopologyError, match="not in this peer's view"):
        a.send(x, to="nobody", timeout_s=5)
    _close([a, b])


def _wait_until_readable(conn: object) -> None:
    import select

    assert select.select([conn], [], [], 5.0)[0], "the peer's close never arrived"


def _kept(comm: Communicator) -> dict[tuple[str, str, int], Any]:
    """The communicator's kept point-to-point connections (the test drops some on purpose)."""
    assert comm._p2p is not None
    return comm._p2p.kept


def _exchange(a: Communicator, b: Communicator, value: float, *, tag: int = 3) -> torch.Tensor:
    out = torch.zeros(1000)
    res = run_threads(
        [
            lambda: a.send(torch.full((1000,), value), to=b.peer_id, tag=tag, timeout_s=20),
            lambda: b.recv(out, from_=a.peer_id, tag=tag, timeout_s=20),
        ]
    )
    assert res == [None, out]
    return out


@pytest.mark.timeout(90)
def test_point_to_point_keeps_one_connection_and_replaces_a_dropped_one(
    master, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from lowcomm.comm import _handshake

    opened: list[str] = []
    real_connect = _handshake.connect

    def counting_connect(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("hello", {}).get("purpose") == "p2p":
            opened.append(kwargs["hello"]["key"])
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(_handshake, "connect", counting_connect)
    a, b = connect_all(addr(master), 2)
    for i in range(5):
        assert torch.equal(_exchange(a, b, float(i)), torch.full((1000,), float(i)))
    assert len(opened) == 1  # five messages, one TCP + auth handshake

    # A recv that times out with nothing sent keeps the connection for the next message.
    from lowcomm.comm.errors import CommTimeoutError

    with pytest.raises(CommTimeoutError):
        b.recv(torch.zeros(1000), from_=a.peer_id, tag=3, timeout_s=0.3)
    assert torch.equal(_exchange(a, b, 5.0), torch.full((1000,), 5.0))
    assert len(opened) == 1

    # The receiver drops its end: the sender notices before sending and opens a new one.
    _kept(b)[("in", a.peer_id, 3)].close()
    _wait_until_readable(_kept(a)[("out", b.peer_id, 3)])  # the FIN has reached the sender
    assert torch.equal(_exchange(a, b, 6.0), torch.full((1000,), 6.0))
    assert len(opened) == 2

    # The sender drops its end: the receiver takes the new connection instead of the kept one.
    _kept(a)[("out", b.peer_id, 3)].close()
    assert torch.equal(_exchange(a, b, 7.0), torch.full((1000,), 7.0))
    assert len(opened) == 3

    # A new tag per message does not pile up connections: past the cap the oldest is closed.
    from lowcomm.comm import _p2p

    monkeypatch.setattr(_p2p, "P2P_KEEP_MAX", 2)
    for tag in (10, 11, 12, 13):
        assert torch.equal(_exchange(a, b, 8.0, tag=tag), torch.full((1000,), 8.0))
    assert len(_kept(a)) <= 2 and len(_kept(b)) <= 2
    assert torch.equal(_exchange(a, b, 9.0, tag=10), torch.full((1000,), 9.0))  # reopened
    _close([a, b])


@pytest.mark.timeout(60)
def test_calls_before_connect_and_bad_arguments_are_refused_clearly(master) -> None:  # type: ignore[no-untyped-def]
    c = communicator(addr(master))
    with pytest.raises(TopologyError, match="connect"):
        c.all_reduce(torch.ones(3))
    c.connect(timeout_s=10)
    with pytest.raises(ValueError, match="op must be"):
        c.all_reduce(torch.ones(3), "prod")
    with pytest.raises(ValueError, match="float32"):
        c.all_reduce(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="peer_group"):
        Communicator(addr(master), peer_group=-1)
    x = torch.full((5,), 3.0)
    info = c.all_reduce(x, "avg", timeout_s=10)  # alone: identity
    assert info.world_size == 1 and torch.equal(x, torch.full((5,), 3.0))
    c.close()


@pytest.mark.timeout(60)
def test_a_corrupt_fault_at_p2p_send_damages_the_bytes_the_receiver_gets(master) -> None:  # type: ignore[no-untyped-def]
    faults = FaultInjector()
    config = dataclasses.replace(FAST, faults=faults)
    a = communicator(addr(master), config=config)
    b = communicator(addr(master))
    _admit_one(a, b)
    faults.inject("p2p.send", corrupt=True, where={"peer": b.peer_id, "tag": 5})
    sent = torch.full((1000,), 2.0)
    assert not torch.equal(_exchange(a, b, 2.0, tag=5), sent)  # the fault really fired
    assert faults.fired("p2p.send") == 1
    assert torch.equal(_exchange(a, b, 2.0, tag=5), sent)  # the next message is clean
    _close([a, b])


def _admit_one(a: Communicator, b: Communicator) -> None:
    a.connect(timeout_s=20)
    results = run_threads([lambda: b.connect(timeout_s=20), lambda: _admit(a, 2)])
    assert results == [None, None], results


def _admit(comm: Communicator, world: int) -> None:
    deadline = time.monotonic() + 20
    while comm.world_size < world and time.monotonic() < deadline:
        if comm.are_peers_pending(timeout_s=10):
            comm.update_topology(timeout_s=10)
        else:
            time.sleep(0.05)


def test_the_tcp_communicator_is_a_comm_backend_made_by_the_factory() -> None:
    c = open_communicator("127.0.0.1:1", token=TOKEN)
    assert isinstance(c, Communicator) and isinstance(c, CommBackend)
    assert c.backend == "tcp"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mine", "theirs", "field"),
    [
        (get_codec("fp4", variant="e3m0"), get_codec("fp4", variant="e2m1"), "variant"),
        (get_codec("uint8", block_size=256), get_codec("uint8", block_size=128), "block_size"),
    ],
)
def test_codec_parameters_differing_between_peers_fail_fast_naming_both_settings(
    master, mine: Codec, theirs: Codec, field: str
) -> None:  # type: ignore[no-untyped-def]
    comms = connect_all(addr(master), 3)
    xs = [torch.randn(1000) for _ in comms]
    before = [x.clone() for x in xs]
    codecs = [mine, theirs, theirs]
    start = time.monotonic()
    res = run_threads(
        [
            lambda c=c, x=x, q=q: c.all_reduce_with_retry(x, quantization=q, timeout_s=30)
            for c, x, q in zip(comms, xs, codecs, strict=True)
        ]
    )
    assert time.monotonic() - start < 5, "refused at the gate, not after a retried failure"
    for r in res:
        assert isinstance(r, TopologyError) and field in str(r), r
        assert repr(mine.params()[field]) in str(r) and repr(theirs.params()[field]) in str(r)
    assert all(torch.equal(x, b) for x, b in zip(xs, before, strict=True))
    _close(comms)


@pytest.mark.timeout(90)
def test_a_message_slower_than_the_grace_is_read_to_its_end_by_a_polling_receiver(
    master, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # The pipeline polls recv in short slices. A message that has begun to arrive is read to its
    # end while its frames keep coming, even when the whole takes longer than the grace (scaled
    # down here from 10 s): giving up half-way closed the connection and lost it for both ends.
    from lowcomm.comm import _p2p
    from lowcomm.comm.errors import CommTimeoutError
    from lowcomm.comm.shaper import Shaper

    monkeypatch.setattr(_p2p, "P2P_MESSAGE_GRACE_S", 0.5)
    slow = dataclasses.replace(FAST, shaper=Shaper(bandwidth_bps=8 * 4e6))  # 4 MB/s
    a = communicator(addr(master), config=slow)
    b = communicator(addr(master))
    a.connect(timeout_s=20)

    def admit() -> None:
        while a.world_size < 2:
            a.update_topology(timeout_s=20)

    assert run_threads([lambda: b.connect(timeout_s=20), admit]) == [None, None]
    x = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB: about a second on the link
    out = torch.zeros_like(x)

    def poll() -> int:
        for attempt in range(200):
            try:
                b.recv(out, from_=a.peer_id, timeout_s=0.2)
                return attempt
            except CommTimeoutError:
                continue
        raise AssertionError("the message never arrived")

    try:
        res = run_threads([lambda: a.send(x, to=b.peer_id, timeout_s=30), poll])
        assert res[0] is None and isinstance(res[1], int), res
        assert torch.equal(out, x)
    finally:
        _close([a, b])


@pytest.mark.timeout(60)
def test_live_revision_answers_within_its_timeout_when_the_master_is_frozen() -> None:
    # The pipeline's watcher probes the membership with a short timeout to notice a lost stage;
    # a SIGSTOPped master must not hold the probe for the control channel's 10 s of slack.
    import os
    import signal
    import subprocess
    import sys

    from lowcomm.comm.errors import PeerFailureError

    code = (
        "import time; from tests.comm._control_harness import start_master; "
        "m = start_master(heartbeat_timeout_s=30.0); print(m.address[1], flush=True); time.sleep(60)"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=root, env=env
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        c = communicator(f"127.0.0.1:{port}")
        c.connect(timeout_s=20)
        assert isinstance(c.live_revision(timeout_s=5.0), int)
        os.kill(proc.pid, signal.SIGSTOP)
        stat = Path(f"/proc/{proc.pid}/stat")
        while stat.read_text().split(") ")[1][0] != "T":
            time.sleep(0.01)  # stopped (the signal is delivered asynchronously)
        start = time.monotonic()
        with pytest.raises(PeerFailureError):
            c.live_revision(timeout_s=1.0)
        assert time.monotonic() - start < 5.0  # was 10.1 s: the probe ignored its timeout
    finally:
        proc.kill()
        proc.wait()
    c.close()


@pytest.mark.timeout(60)
def test_a_request_interrupted_before_its_reply_closes_its_master_connection(master) -> None:  # type: ignore[no-untyped-def]
    # An exception that is no comm error (an interrupt, a bug) between sending a request and
    # reading its reply must not leave the reply unread: the next request would take it for its
    # own answer (here: are_peers_pending() reading the vote's reply).
    c = communicator(addr(master))
    c.connect(timeout_s=30)
    try:
        assert c.vote("warm", True).ok  # opens the main control connection
        conn = c._control._ctls["main"]
        assert conn is not None
        real = conn.recv_json

        def interrupted(*args: Any, **kwargs: Any) -> Any:
            conn.recv_json = real  # type: ignore[method-assign]
            raise RuntimeError("interrupted while waiting for the reply")

        conn.recv_json = interrupted  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="interrupted while waiting"):
            c.vote("a", True)
        assert conn.closed
        assert c.are_peers_pending() is False
        assert c.vote("b", True).ok
    finally:
        c.close()
