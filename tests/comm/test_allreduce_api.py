"""The public all-reduce's own contract: the caller's tensor (and ``out``) untouched after a ring
failure although the ring writes them directly, ``quantization="auto"``, master round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _control_harness import FAST, addr, communicator, run_threads, start_master

from lowcomm.comm import AllReduceInfo, Communicator
from lowcomm.comm.errors import CommError, PeerFailureError, TopologyError
from lowcomm.faults import FaultInjector


@pytest.fixture
def master():  # type: ignore[no-untyped-def]
    m = start_master()
    yield m
    m.stop()


def _pair(master, faults: FaultInjector | None = None) -> list[Communicator]:  # type: ignore[no-untyped-def]
    config = FAST if faults is None else dataclasses.replace(FAST, faults=faults)
    a = communicator(addr(master), config=config)
    b = communicator(addr(master))
    a.connect(timeout_s=20)

    def admit() -> None:
        while a.world_size < 2:
            a.update_topology(timeout_s=20)

    def join() -> None:
        b.connect(timeout_s=20)

    assert run_threads([join, admit]) == [None, None]
    return [a, b]


def _close(comms: list[Communicator]) -> None:
    for c in comms:
        c.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("with_out", [False, True])
def test_a_ring_failure_in_the_all_gather_leaves_the_tensor_and_out_as_they_were(
    master,  # type: ignore[no-untyped-def]
    with_out: bool,
) -> None:
    # The ring writes the caller's tensor (or out=) directly; a sending thread that fails in the
    # all-gather (2 peers: step 1), after the first all-gather sub-chunks have landed there, fails
    # the op on both peers, and each must put back what was there before.
    faults = FaultInjector()
    comms = _pair(master, faults)
    numel = 1 << 20  # 4 MiB: several sub-chunks per chunk
    faults.inject("ring.send", error=PeerFailureError("injected"), where={"step": 1}, after=2)
    xs = [torch.full((numel,), float(i + 1)) for i in range(2)]
    outs = [torch.full((numel,), -7.0) for _ in range(2)] if with_out else [None, None]
    results = run_threads(
        [
            lambda c=c, x=x, o=o: c.all_reduce(x, "sum", out=o, timeout_s=30)
            for c, x, o in zip(comms, xs, outs, strict=True)
        ]
    )
    assert faults.fired("ring.send") == 1
    assert all(isinstance(r, CommError) for r in results), results
    for i in range(2):
        assert torch.equal(xs[i], torch.full((numel,), float(i + 1))), "the input was changed"
        if with_out:
            assert torch.equal(outs[i], torch.full((numel,), -7.0)), "out was changed"  # type: ignore[arg-type]
    # The retry (a new ring) is exact.
    results = run_threads(
        [
            lambda c=c, x=x, o=o: c.all_reduce(x, "sum", out=o, timeout_s=30)
            for c, x, o in zip(comms, xs, outs, strict=True)
        ]
    )
    assert all(isinstance(r, AllReduceInfo) for r in results), results
    for i in range(2):
        got = outs[i] if with_out else xs[i]
        assert torch.equal(got, torch.full((numel,), 3.0))  # type: ignore[arg-type]
    _close(comms)


@pytest.mark.timeout(90)
def test_auto_quantization_times_fp32_then_uint8_and_every_peer_takes_the_same_decision(
    master,  # type: ignore[no-untyped-def]
) -> None:
    comms = _pair(master)
    gen = torch.Generator().manual_seed(3)
    numel = 1 << 19  # 2 MiB: above AUTO_MIN_BYTES
    used: list[list[str | None]] = [[], []]
    for _ in range(4):
        xs = [torch.randn(numel, generator=gen) for _ in comms]
        exact = xs[0] + xs[1]
        infos = run_threads(
            [
                lambda c=c, x=x: c.all_reduce(x, "sum", quantization="auto", timeout_s=30)
                for c, x in zip(comms, xs, strict=True)
            ]
        )
        assert all(isinstance(i, AllReduceInfo) for i in infos), infos
        for k, info in enumerate(infos):
            used[k].append(info.codec)
        assert torch.equal(xs[0], xs[1]), "peers disagree bit for bit"
        if infos[0].codec is None:
            assert torch.equal(xs[0], exact)
        else:
            assert not torch.equal(xs[0], exact) and (xs[0] - exact).abs().max() < 0.1
    assert used[0] == used[1], used
    # The first large op of the ring is exact, the second quantized; then the decision holds.
    assert used[0][:2] == [None, "uint8"] and used[0][2] == used[0][3], used
    # Small tensors are never quantized.
    small = [torch.ones(1000) for _ in comms]
    infos = run_threads(
        [
            lambda c=c, x=x: c.all_reduce(x, "sum", quantization="auto", timeout_s=30)
            for c, x in zip(comms, small, strict=True)
        ]
    )
    assert [i.codec for i in infos] == [None, None], infos  # type: ignore[union-attr]
    # "auto" on one peer and "uint8" on the other is a mismatch both peers hear about.
    results = run_threads(
        [
            lambda: comms[0].all_reduce(torch.ones(10), quantization="auto", timeout_s=30),
            lambda: comms[1].all_reduce(torch.ones(10), quantization="uint8", timeout_s=30),
        ]
    )
    assert all(isinstance(r, TopologyError) and "auto" in str(r) for r in results), results
    _close(comms)


@pytest.mark.timeout(60)
def test_an_all_reduce_alone_makes_two_master_round_trips_and_with_peers_at_least_two(
    master,  # type: ignore[no-untyped-def]
) -> None:
    c = communicator(addr(master))
    c.connect(timeout_s=20)
    info = c.all_reduce(torch.ones(1024), "sum", timeout_s=10)
    assert info.master_round_trips == 2  # the gate and the vote
    c.close()
    comms = _pair(master)
    infos = run_threads(
        [lambda c=c: c.all_reduce(torch.ones(1024), "sum", timeout_s=30) for c in comms]
    )
    assert all(i.master_round_trips >= 2 for i in infos), infos  # type: ignore[union-attr]
    _close(comms)


@pytest.mark.timeout(60)
def test_strided_and_half_precision_tensors_all_reduce_in_place(master) -> None:  # type: ignore[no-untyped-def]
    # Through host buffers (a strided view), and with the ring's own staging (bf16).
    comms = _pair(master)
    bases = [torch.full((2001,), float(i + 1)) for i in range(2)]
    views = [b[::2] for b in bases]
    halves = [torch.full((999,), float(i + 1), dtype=torch.bfloat16) for i in range(2)]
    for tensors in (views, halves):
        results = run_threads(
            [
                lambda c=c, t=t: c.all_reduce(t, "sum", timeout_s=30)
                for c, t in zip(comms, tensors, strict=True)
            ]
        )
        assert all(isinstance(r, AllReduceInfo) for r in results), results
        assert all(torch.all(t == 3.0) for t in tensors)
    assert all(torch.all(b[1::2] == float(i + 1)) for i, b in enumerate(bases))  # untouched
    _close(comms)


def test_ring_settings_follow_the_neighbours_addresses_unless_configured() -> None:
    from lowcomm.comm import CommConfig, _allreduce

    local = {"rank": 1, "addresses": [["127.0.0.1", 1], ["127.0.0.1", 2], ["127.0.0.5", 3]]}
    wan = {"rank": 1, "addresses": [["127.0.0.1", 1], ["127.0.0.1", 2], ["10.0.0.7", 3]]}
    default = CommConfig()
    assert _allreduce._num_connections(local, default) == 1
    assert not _allreduce._thread_per_connection(local, default)
    assert _allreduce._num_connections(wan, default) == 4  # one neighbour is remote
    assert _allreduce._thread_per_connection(wan, default)
    # Both ends of a link must open the same number of connections: every rank of a ring that
    # mixes loopback and remote addresses picks one count (rank 0's neighbours are 3 and 2,
    # both loopback in `mixed`, rank 1's are 0 and 2, one of them remote).
    mixed = [["127.0.0.1", 1], ["10.0.0.7", 2], ["127.0.0.1", 3], ["127.0.0.1", 4]]
    counts = {
        _allreduce._num_connections({"rank": r, "addresses": mixed}, default) for r in range(4)
    }
    assert counts == {4}
    chosen = CommConfig(num_connections=3, thread_per_connection=True)
    assert _allreduce._num_connections(local, chosen) == 3
    assert _allreduce._thread_per_connection(local, chosen)


@pytest.mark.timeout(90)
def test_auto_quantization_keeps_non_finite_values_of_an_op_that_travels_in_fp32(master) -> None:  # type: ignore[no-untyped-def]
    # "auto" sends ops under AUTO_MIN_BYTES in exact fp32, so an inf (an overflow check, a mask)
    # is reduced like any fp32 value instead of being refused as a quantized contribution.
    comms = _pair(master)
    try:
        xs = [torch.tensor([1.0, float("inf")]), torch.tensor([2.0, 3.0])]
        run_threads(
            [
                lambda c=c, x=x: c.all_reduce(x, "max", quantization="auto", timeout_s=20)
                for c, x in zip(comms, xs, strict=True)
            ]
        )
        for x in xs:
            assert x.tolist() == [2.0, float("inf")]
    finally:
        _close(comms)


def _group(master, n: int, faults: FaultInjector | None = None) -> list[Communicator]:  # type: ignore[no-untyped-def]
    if n == 2:
        return _pair(master, faults)
    config = FAST if faults is None else dataclasses.replace(FAST, faults=faults)
    first = communicator(addr(master), config=config)
    first.connect(timeout_s=20)
    rest = [communicator(addr(master)) for _ in range(n - 1)]

    def admit() -> None:
        while first.world_size < n:
            first.update_topology(timeout_s=20)

    def join(c: Communicator) -> None:
        c.connect(timeout_s=20)
        while c.world_size < n:  # every accepted peer takes part in every update_topology()
            c.update_topology(timeout_s=20)

    assert run_threads([*(lambda c=c: join(c) for c in rest), admit]) == [None] * n
    return [first, *rest]


@pytest.mark.timeout(90)
def test_a_failure_before_the_ring_wrote_a_part_leaves_that_part_as_it_was(master) -> None:  # type: ignore[no-untyped-def]
    # The ring saves each part of the caller's tensor just before it overwrites it, into a buffer
    # kept between ops; a failure must put back only the saved parts, never the buffer's stale
    # rest (an earlier op's values). Peer 0 fails before its first sub-chunk leaves, so peer 1
    # receives nothing and never writes the chunk it would have reduced.
    faults = FaultInjector()
    comms = _pair(master, faults)
    numel = 1 << 20
    gen = torch.Generator().manual_seed(3)
    first = [torch.randn(numel, generator=gen) for _ in range(2)]
    results = run_threads(
        [
            lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=30)
            for c, x in zip(comms, first, strict=True)
        ]
    )
    assert all(isinstance(r, AllReduceInfo) for r in results), results
    faults.inject("ring.send", error=PeerFailureError("injected"), where={"step": 0}, after=0)
    xs = [torch.randn(numel, generator=gen) for _ in range(2)]
    before = [x.clone() for x in xs]
    results = run_threads(
        [
            lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=30)
            for c, x in zip(comms, xs, strict=True)
        ]
    )
    assert faults.fired("ring.send") == 1
    assert all(isinstance(r, CommError) for r in results), results
    for x, b in zip(xs, before, strict=True):
        assert torch.equal(x, b), "a part the ring never wrote was changed"
    _close(comms)


@pytest.mark.timeout(120)
def test_three_peers_in_place_are_exact_and_a_late_failure_restores_every_part(master) -> None:  # type: ignore[no-untyped-def]
    # 3 peers: partial sums are forwarded from the ring's own buffer while the caller's tensor
    # still holds the local values; every peer ends bit-identical, and a failure in the last
    # all-gather step (3) puts every overwritten part back.
    faults = FaultInjector()
    comms = _group(master, 3, faults)
    numel = 3 * (1 << 18) + 5  # ragged chunks, several sub-chunks each
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(numel, generator=gen) for _ in range(3)]
    want = xs[0] + xs[1] + xs[2]
    results = run_threads(
        [
            lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=30)
            for c, x in zip(comms, xs, strict=True)
        ]
    )
    assert all(isinstance(r, AllReduceInfo) for r in results), results
    assert torch.equal(xs[0], xs[1]) and torch.equal(xs[1], xs[2])
    assert torch.allclose(xs[0], want, atol=1e-5)
    faults.inject("ring.send", error=PeerFailureError("injected"), where={"step": 3}, after=1)
    before = [x.clone() for x in xs]
    results = run_threads(
        [
            lambda c=c, x=x: c.all_reduce(x, "avg", timeout_s=30)
            for c, x in zip(comms, xs, strict=True)
        ]
    )
    assert faults.fired("ring.send") == 1
    assert all(isinstance(r, CommError) for r in results), results
    for x, b in zip(xs, before, strict=True):
        assert torch.equal(x, b), "the tensor was not restored"
    _close(comms)
