"""Ring all-reduce: results against a reference, bit-identical peers, quantization, bounded faults."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lowcomm.comm import (
    PeerListener,
    Ring,
    _frames,
    _handshake,
    _ring_threads,
    _ring_wire,
    connect_ring,
)
from lowcomm.comm import ring as ring_module
from lowcomm.comm.errors import (
    AuthenticationError,
    CommError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
)
from lowcomm.faults import KILLED_EXIT_CODE, FaultInjector
from tests._tokens import OTHER_TOKEN, TOKEN

PEER_SCRIPT = Path(__file__).with_name("_ring_peer.py")


def _run_all(fns: list[Callable[[], Any]], timeout_s: float = 60.0) -> list[Any]:
    """Runs each fn on its own thread; returns results, or the exception where one raised."""
    results: list[Any] = [None] * len(fns)

    def wrap(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a peer thread hung"
    return results


class Cluster:
    """``n`` ring peers as threads of this process, each with its own listener."""

    def __init__(
        self,
        n: int,
        *,
        num_connections: int = 2,
        subchunk_bytes: int = 1 << 16,
        thread_per_connection: bool = True,
        faults: dict[int, FaultInjector] | None = None,
        encryption: bool = True,
    ) -> None:
        self.listeners = [
            PeerListener("127.0.0.1", 0, token=TOKEN, encryption=encryption) for _ in range(n)
        ]
        addresses = [lst.address for lst in self.listeners]
        made = _run_all(
            [
                lambda r=r: connect_ring(
                    listener=self.listeners[r],
                    rank=r,
                    addresses=addresses,
                    ring_id=f"test-{n}",
                    token=TOKEN,
                    num_connections=num_connections,
                    timeout_s=20,
                    subchunk_bytes=subchunk_bytes,
                    thread_per_connection=thread_per_connection,
                    faults=(faults or {}).get(r),
                    encryption=encryption,
                )
                for r in range(n)
            ]
        )
        for ring in made:
            assert isinstance(ring, Ring), ring
        self.rings: list[Ring] = made

    def all_reduce(
        self,
        tensors: list[torch.Tensor],
        op: str,
        *,
        outs: list[torch.Tensor] | None = None,
        **kw: Any,
    ) -> list[Any]:
        return _run_all(
            [
                lambda r=r: self.rings[r].all_reduce(
                    tensors[r], op, out=None if outs is None else outs[r], **kw
                )
                for r in range(len(tensors))
            ]
        )

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        for lst in self.listeners:
            lst.close()


@pytest.fixture
def cluster3() -> Iterator[Cluster]:
    c = Cluster(3)
    yield c
    c.close()


def _reference(inputs: list[torch.Tensor], op: str) -> torch.Tensor:
    stacked = torch.stack([t.double() for t in inputs])
    if op == "sum":
        return stacked.sum(0)
    if op == "avg":
        return stacked.mean(0)
    if op == "min":
        return stacked.min(0).values
    return stacked.max(0).values


def _inputs(n: int, numel: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=gen).to(dtype) for _ in range(n)]


# ----- correctness ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_op_matches_a_reference_and_is_bit_identical_on_every_peer(
    cluster3: Cluster, dtype: torch.dtype
) -> None:
    numel = 30_011  # odd, and split into many 64 KiB sub-chunks striped over 2 connections
    for seed, op in enumerate(("sum", "avg", "min", "max")):
        inputs = _inputs(3, numel, dtype, seed=seed)
        originals = [t.clone() for t in inputs]
        outs = [torch.empty_like(t) for t in inputs]
        results = cluster3.all_reduce(inputs, op, outs=outs, tag=7)
        assert all(not isinstance(r, BaseException) for r in results), results
        ref = _reference(originals, op)
        # fp32 accumulation, one rounding to the output dtype at the end.
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(outs[0].double(), ref, rtol=tol, atol=tol)
        for out in outs[1:]:
            assert torch.equal(out, outs[0]), f"{op} {dtype}: peers disagree"
        for t, o in zip(inputs, originals, strict=True):
            assert torch.equal(t, o), "the input was modified although out= was given"
        # Partial sums travel as fp32; the all-gather carries fp16/bf16 results at 2 bytes each.
        fp32_bytes = 2 * 2 / 3 * numel * 4
        bound = 1.05 if dtype == torch.float32 else 0.8
        assert results[0].tx_bytes < fp32_bytes * bound


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_small_op_runs_on_the_calling_thread_bit_identical_to_the_threaded_pipeline(
    cluster3: Cluster, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []

    class CountingThread(threading.Thread):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    fake = SimpleNamespace(Thread=CountingThread, Lock=threading.Lock, Event=threading.Event)
    monkeypatch.setattr(_ring_threads, "threading", fake)
    numel = 1024  # 4 KiB of fp32: frames of a third of it
    inline_bytes = ring_module._INLINE_FRAME_BYTES
    for seed, op in enumerate(("sum", "avg", "min", "max")):
        inputs = _inputs(3, numel, dtype, seed=seed)
        results: dict[str, list[torch.Tensor]] = {}
        for path, frame_bytes in (("inline", inline_bytes), ("threads", 0)):
            monkeypatch.setattr(ring_module, "_INLINE_FRAME_BYTES", frame_bytes)
            for place in ("out", "in_place"):
                tensors = [t.clone() for t in inputs]
                outs = [torch.empty_like(t) for t in inputs] if place == "out" else None
                before = len(started)
                done = cluster3.all_reduce(tensors, op, outs=outs, tag=seed)
                assert all(not isinstance(r, BaseException) for r in done), done
                assert (len(started) == before) == (path == "inline"), (path, started[before:])
                results[f"{path}-{place}"] = outs if outs is not None else tensors
        ref = results["threads-out"]
        for key, got in results.items():
            for r in range(3):
                assert torch.equal(got[r], ref[0]), f"{op} {dtype} {key} rank {r} differs"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("numel", [0, 1, 2, 3, 5, 7])
def test_sizes_smaller_than_the_world_reduce_correctly_in_place(numel: int) -> None:
    cluster = Cluster(4, num_connections=3)
    try:
        inputs = _inputs(4, numel, torch.float32, seed=numel)
        ref = _reference(inputs, "sum").float()
        results = cluster.all_reduce(inputs, "sum")
        assert all(not isinstance(r, BaseException) for r in results), results
        for t in inputs:
            torch.testing.assert_close(t, ref)
            assert torch.equal(t, inputs[0])
    finally:
        cluster.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("thread_per_connection", [True, False])
def test_large_tensor_with_many_striped_sub_chunks_and_two_dimensional_shape(
    thread_per_connection: bool,
) -> None:
    cluster = Cluster(
        2, num_connections=3, subchunk_bytes=4096, thread_per_connection=thread_per_connection
    )
    try:
        inputs = [t.view(101, 997) for t in _inputs(2, 101 * 997, torch.float32, seed=3)]
        ref = _reference(inputs, "avg").float()
        results = cluster.all_reduce(inputs, "avg")
        assert all(not isinstance(r, BaseException) for r in results), results
        torch.testing.assert_close(inputs[0], ref)
        assert torch.equal(inputs[0], inputs[1])
        # Stats: every peer sent 2 (n-1)/n of the tensor (plus headers) and received as much.
        stats = results[0]
        payload = 101 * 997 * 4
        assert payload <= stats.tx_bytes < payload * 1.1
        assert payload <= stats.rx_bytes < payload * 1.1
    finally:
        cluster.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_place_all_reduce(cluster3: Cluster, dtype: torch.dtype) -> None:
    inputs = _inputs(3, 4_099, dtype, seed=21)
    ref = _reference(inputs, "sum")
    results = cluster3.all_reduce(inputs, "sum")
    assert all(not isinstance(r, BaseException) for r in results), results
    assert inputs[0].dtype == dtype
    torch.testing.assert_close(inputs[0].double(), ref, rtol=1.6e-2, atol=1.6e-2)
    assert torch.equal(inputs[0], inputs[1]) and torch.equal(inputs[1], inputs[2])


@pytest.mark.timeout(60)
def test_consecutive_operations_reuse_the_ring(cluster3: Cluster) -> None:
    for i in range(5):
        inputs = _inputs(3, 1000 + i, torch.float32, seed=i)
        ref = _reference(inputs, "max").float()
        results = cluster3.all_reduce(inputs, "max", tag=i)
        assert all(not isinstance(r, BaseException) for r in results), results
        assert torch.equal(inputs[0], ref)


def test_world_of_one_copies_into_out() -> None:
    listener = PeerListener("127.0.0.1", 0, token=TOKEN)
    try:
        ring = connect_ring(
            listener=listener, rank=0, addresses=[listener.address], ring_id="solo", token=TOKEN
        )
        x = torch.arange(5.0)
        out = torch.empty(5)
        ring.all_reduce(x, "avg", out=out)
        assert torch.equal(out, x)
    finally:
        listener.close()


def test_bad_arguments_are_value_errors(cluster3: Cluster) -> None:
    ring = cluster3.rings[0]
    with pytest.raises(ValueError, match="op must be"):
        ring.all_reduce(torch.zeros(3), "prod")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ring.all_reduce(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        ring.all_reduce(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="out must match"):
        ring.all_reduce(torch.zeros(3), out=torch.zeros(4))
    assert not ring.closed  # argument errors do not break the ring


# ----- quantized ---------------------------------------------------------------------------


def _uint8_codec() -> Any:
    compression = pytest.importorskip("lowcomm.compression")
    if not hasattr(compression, "get_codec"):
        pytest.skip("lowcomm.compression has no get_codec yet")
    return compression.get_codec("uint8")


@pytest.mark.timeout(60)
def test_uint8_all_reduce_is_bit_identical_unbiased_and_close_to_the_exact_sum(
    cluster3: Cluster,
) -> None:
    codec = _uint8_codec()
    numel = 300_007
    inputs = _inputs(3, numel, torch.float32, seed=11)
    originals = [t.clone() for t in inputs]
    outs = [torch.empty_like(t) for t in inputs]
    results = cluster3.all_reduce(inputs, "sum", codec=codec, outs=outs)
    assert all(not isinstance(r, BaseException) for r in results), results
    for out in outs[1:]:
        assert torch.equal(out, outs[0]), "quantized results differ between peers"
    err = outs[0].double() - _reference(originals, "sum")
    rmse = err.pow(2).mean().sqrt().item()
    # Each of the 3 quantizations (two partial sums, one final chunk) rounds to nearest: the
    # error is small and has no systematic sign (PCCL's truncating quantizer: bias ~ -0.025).
    assert 0 < rmse < 0.05
    assert abs(err.mean().item()) < 5 * rmse / math.sqrt(numel)
    # Fewer bytes travel than for fp32.
    assert results[0].tx_bytes < 2 * (3 - 1) / 3 * numel * 4 * 0.3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("thread_per_connection", [True, False])
def test_uint8_all_reduce_of_four_peers_with_many_sub_chunks_per_chunk(
    thread_per_connection: bool,
) -> None:
    # Four peers, so partial sums are re-encoded on the way (two reduce-scatter hops before the
    # owner), many sub-chunks over three connections: relayed sub-chunks arrive while the first
    # step is still being encoded, and each connection must still carry its frames in order.
    codec = _uint8_codec()
    cluster = Cluster(
        4, num_connections=3, subchunk_bytes=1 << 16, thread_per_connection=thread_per_connection
    )
    try:
        inputs = _inputs(4, 400_003, torch.float32, seed=12)
        ref = _reference(inputs, "avg")
        outs = [torch.empty_like(t) for t in inputs]
        results = cluster.all_reduce(inputs, "avg", codec=codec, outs=outs)
        assert all(not isinstance(r, BaseException) for r in results), results
        for out in outs[1:]:
            assert torch.equal(out, outs[0]), "quantized results differ between peers"
        rmse = (outs[0].double() - ref).pow(2).mean().sqrt().item()
        assert 0 < rmse < 0.02
    finally:
        cluster.close()


@pytest.mark.timeout(60)
def test_uint8_average_of_bf16_inputs(cluster3: Cluster) -> None:
    codec = _uint8_codec()
    inputs = _inputs(3, 5_003, torch.bfloat16, seed=5)
    ref = _reference(inputs, "avg")
    results = cluster3.all_reduce(inputs, "avg", codec=codec)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert inputs[0].dtype == torch.bfloat16
    assert torch.equal(inputs[0], inputs[1]) and torch.equal(inputs[1], inputs[2])
    assert (inputs[0].double() - ref).abs().max().item() < 0.1


@pytest.mark.timeout(60)
def test_uint8_all_reduce_with_zstd_travels_in_the_codecs_own_format(cluster3: Cluster) -> None:
    compression = pytest.importorskip("lowcomm.compression")
    pytest.importorskip("zstandard")
    codec = compression.get_codec("uint8", zstd_level=1)
    plain = _uint8_codec()
    inputs = _inputs(3, 200_003, torch.float32, seed=8)
    outs = [torch.empty_like(t) for t in inputs]
    results = cluster3.all_reduce(inputs, "sum", codec=codec, outs=outs)
    assert all(not isinstance(r, BaseException) for r in results), results
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    # The same values as the raw path (zstd is lossless), bit for bit.
    raw_outs = [torch.empty_like(t) for t in inputs]
    results = cluster3.all_reduce(inputs, "sum", codec=plain, outs=raw_outs)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert torch.equal(raw_outs[0], outs[0])


@pytest.mark.timeout(60)
def test_a_corrupted_quantized_sub_chunk_fails_its_checksum_and_nothing_is_applied() -> None:
    # The crc32c guards quantized sub-chunks on a ring whose frames are not sealed (a sealed
    # frame's AEAD tag covers every byte on the wire: see the next test).
    codec = _uint8_codec()
    faults = FaultInjector()
    # Peer 1's first quantized sub-chunk leaves with one byte flipped.
    faults.inject("ring.send", corrupt=True, where={"step": 0, "sub": 0})
    cluster = Cluster(3, faults={1: faults}, encryption=False)
    try:
        inputs = _inputs(3, 100_000, torch.float32, seed=4)
        originals = [t.clone() for t in inputs]
        results = cluster.all_reduce(inputs, "sum", codec=codec, timeout_s=20)
    finally:
        cluster.close()
    assert faults.fired("ring.send") == 1, "the fault did not fire"
    assert all(isinstance(r, CommError) for r in results), results
    assert any(isinstance(r, ProtocolError) and "crc32c" in str(r) for r in results), results
    for t, o in zip(inputs, originals, strict=True):
        assert torch.equal(t, o), "a failed operation changed its input"


@pytest.mark.timeout(60)
def test_a_sealed_ring_sends_quantized_sub_chunks_without_a_crc_and_both_agree() -> None:
    codec = _uint8_codec()
    inputs = _inputs(3, 300_000, torch.float32, seed=6)
    outs: dict[bool, list[torch.Tensor]] = {}
    tx: dict[bool, int] = {}
    for encryption in (True, False):
        cluster = Cluster(3, num_connections=1, encryption=encryption)
        try:
            outs[encryption] = [torch.empty_like(t) for t in inputs]
            results = cluster.all_reduce(inputs, "sum", codec=codec, outs=outs[encryption])
        finally:
            cluster.close()
        assert all(not isinstance(r, BaseException) for r in results), results
        assert all(r.seconds > 0 for r in results)
        tx[encryption] = results[0].tx_bytes
    for sealed, plain in zip(outs[True], outs[False], strict=True):
        assert torch.equal(sealed, plain)
    assert torch.equal(outs[True][0], outs[True][2])
    # The layouts: the sealed one has no crc32c after the parts.
    nbytes = {c: _ring_wire.Layout(codec, 50_000, checksum=c).nbytes for c in (True, False)}
    assert nbytes[True] - nbytes[False] == 4
    # On the wire, per frame (each sub-chunk here is one record): sealing adds its 16-byte tag
    # and drops the 4-byte crc32c, so the sealed op sends 12 more bytes per frame; the op sends
    # 2 (n - 1) k = 4k frames per peer (k sub-chunks per chunk). Were the crc32c still sent, the
    # difference would be 16 per frame: 64k, not a multiple of 12 for the k = 2 of this size.
    diff = tx[True] - tx[False]
    assert diff > 0 and diff % 12 == 0 and (diff // 12) % 4 == 0, tx


# ----- peers out of step -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_peers_in_different_operations_fail_with_a_protocol_error_not_a_hang() -> None:
    cluster = Cluster(3)
    try:
        inputs = _inputs(3, 10_000, torch.float32)
        start = time.monotonic()
        results = _run_all(
            [
                lambda r=r: cluster.rings[r].all_reduce(inputs[r], tag=1 if r else 2, timeout_s=20)
                for r in range(3)
            ]
        )
        assert time.monotonic() - start < 20
        assert all(isinstance(r, CommError) for r in results), results
        assert any(
            isinstance(r, ProtocolError) and "different operations" in str(r) for r in results
        )
        assert all(ring.closed for ring in cluster.rings)
    finally:
        cluster.close()


@pytest.mark.timeout(60)
def test_peers_that_disagree_on_op_or_size_fail_with_a_protocol_error() -> None:
    for case in ("op", "size"):
        cluster = Cluster(2)
        try:
            x = [torch.ones(1000), torch.ones(1000 if case == "op" else 2000)]
            ops = ["sum", "max" if case == "op" else "sum"]
            results = _run_all(
                [
                    lambda r=r, c=cluster, x=x, ops=ops: c.rings[r].all_reduce(
                        x[r], ops[r], timeout_s=20
                    )
                    for r in (0, 1)
                ]
            )
            assert all(isinstance(r, CommError) for r in results), results
            assert any(isinstance(r, ProtocolError) for r in results), results
            assert torch.equal(x[0], torch.ones(1000)), "input modified by a failed operation"
        finally:
            cluster.close()


@pytest.mark.timeout(60)
def test_a_failed_ring_refuses_further_operations(cluster3: Cluster) -> None:
    cluster3.rings[1].close()
    inputs = _inputs(3, 1000, torch.float32)
    results = cluster3.all_reduce(inputs, "sum", timeout_s=10)
    assert all(isinstance(r, PeerFailureError) for r in results), results
    with pytest.raises(PeerFailureError, match="build a new ring"):
        cluster3.rings[0].all_reduce(inputs[0])


@pytest.mark.timeout(60)
def test_a_stalled_sender_thread_makes_every_peer_time_out_within_the_bound() -> None:
    stalled = threading.Event()
    release = threading.Event()
    faults = FaultInjector()
    cluster = Cluster(3, faults={1: faults})
    victim = cluster.rings[1]

    def stall(context: Any) -> None:
        stalled.set()
        # The peer stops sending but keeps its sockets open, until its own ring is aborted.
        while not victim.closed and not release.wait(0.05):
            pass

    # Every sub-chunk of step 1 that peer 1 is about to send stalls.
    faults.inject("ring.send", call=stall, where={"step": 1}, times=None)
    try:
        inputs = _inputs(3, 200_000, torch.float32)
        originals = [t.clone() for t in inputs]
        start = time.monotonic()
        results = cluster.all_reduce(inputs, "sum", timeout_s=2.0)
        elapsed = time.monotonic() - start
        release.set()
    finally:
        cluster.close()
    assert stalled.is_set() and faults.fired("ring.send") >= 1, "the fault did not fire"
    assert all(isinstance(r, CommError) for r in results), results
    assert any(isinstance(r, CommTimeoutError) for r in results), results
    assert elapsed < 2.0 + 10  # timeout_s plus unwinding, never the stall's 30 s
    for t, o in zip(inputs, originals, strict=True):
        assert torch.equal(t, o)


# ----- listener ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_listener_survives_garbage_and_wrong_tokens_and_still_routes(cluster3: Cluster) -> None:
    listener = PeerListener("127.0.0.1", 0, token=TOKEN, handshake_timeout_s=2)
    try:
        for junk in (b"\xff" * 100, _frames.HEADER.pack(_frames.MAGIC, 1, 1, 0, 0, 0, 2**50), b""):
            with socket.create_connection(listener.address) as raw:
                raw.sendall(junk)
        with pytest.raises(AuthenticationError, match="run token rejected by"):
            _handshake.connect(listener.address, token=OTHER_TOKEN, hello={}, timeout_s=5)
        silent = socket.create_connection(listener.address)  # never speaks; times out alone
        conn, _ = _handshake.connect(
            listener.address, token=TOKEN, hello={"purpose": "p2p", "key": "a"}, timeout_s=5
        )
        [(server, hello)] = listener.wait_for("p2p", "a", count=1, timeout_s=5)
        assert hello["purpose"] == "p2p"
        conn.send_frame(64, b"ping", timeout_s=5)
        assert server.recv_frame(timeout_s=5).payload == b"ping"
        with pytest.raises(CommTimeoutError, match="1 'p2p' connections"):
            listener.wait_for("p2p", "a", count=1, timeout_s=0.2)
        silent.close()
        conn.close()
        server.close()
    finally:
        listener.close()


def test_listener_hands_connections_to_a_registered_handler() -> None:
    listener = PeerListener("127.0.0.1", 0, token=TOKEN)
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def handler(conn: _frames.Connection, hello: dict[str, Any]) -> None:
        got.append(hello)
        conn.close()
        done.set()

    try:
        listener.set_handler("state", handler)
        conn, _ = _handshake.connect(
            listener.address, token=TOKEN, hello={"purpose": "state", "key": "k"}, timeout_s=5
        )
        assert done.wait(10)
        assert got == [{"purpose": "state", "key": "k"}]
        conn.close()
    finally:
        listener.close()


# ----- real processes: killed and stopped peers ------------------------------------------------


def _spawn_ring(n: int, **cfg: Any) -> tuple[list[subprocess.Popen[str]], list[dict[str, Any]]]:
    procs = []
    for rank in range(n):
        conf = {"rank": rank, "token": TOKEN.decode(), **cfg}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(PEER_SCRIPT), json.dumps(conf)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    addresses = []
    for p in procs:
        assert p.stdout is not None
        addresses.append(json.loads(p.stdout.readline())["address"])
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(json.dumps(addresses) + "\n")
        p.stdin.flush()
    return procs, addresses


def _outcome(p: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    assert p.stdout is not None
    out, _ = p.communicate(timeout=timeout_s)
    return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.timeout(90)
def test_peer_killed_mid_allreduce_fails_fast_on_survivors_with_inputs_untouched() -> None:
    timeout_s = 30.0
    procs, _ = _spawn_ring(
        3,
        numel=3_000_000,
        subchunk_bytes=1 << 20,
        fault="kill",
        fault_rank=1,
        fault_step=1,
        timeout_s=timeout_s,
    )
    try:
        assert procs[1].wait(timeout=60) == KILLED_EXIT_CODE, (
            "the victim did not die by the injected fault"
        )
        survivors = [_outcome(procs[r], 60) for r in (0, 2)]
    finally:
        for p in procs:
            p.kill()
    for res in survivors:
        # A death is detected as a death (the connection ended), not by waiting out the timeout.
        assert res["error"] in ("PeerFailureError", "TruncatedFrameError"), res
        assert res["elapsed_s"] < timeout_s, res
        assert res["untouched"], "a survivor applied a partial result"


@pytest.mark.timeout(90)
@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_sigstopped_peer_makes_survivors_time_out_instead_of_freezing() -> None:
    timeout_s = 3.0
    procs, _ = _spawn_ring(
        3,
        numel=3_000_000,
        subchunk_bytes=1 << 20,
        fault="stop",
        fault_rank=1,
        fault_step=1,
        timeout_s=timeout_s,
    )
    try:
        survivors = [_outcome(procs[r], 60) for r in (0, 2)]
        with open(f"/proc/{procs[1].pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        assert state == "T", "the victim was not stopped: the fault did not fire"
    finally:
        for p in procs:
            with_suppressed_kill(p)
    for res in survivors:
        assert res["error"] in ("CommTimeoutError", "PeerFailureError", "TruncatedFrameError")
        assert res["elapsed_s"] < timeout_s + 15, res
        assert res["untouched"]
    assert any(res["error"] == "CommTimeoutError" for res in survivors), survivors


def with_suppressed_kill(p: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)


@pytest.mark.timeout(60)
def test_uint8_all_reduce_of_sizes_smaller_than_the_world() -> None:
    codec = _uint8_codec()
    cluster = Cluster(4, num_connections=3)
    try:
        for numel in (0, 2, 5):
            inputs = _inputs(4, numel, torch.float32, seed=numel)
            ref = _reference(inputs, "sum")
            results = cluster.all_reduce(inputs, "sum", codec=codec)
            assert all(not isinstance(r, BaseException) for r in results), results
            for t in inputs:
                assert torch.equal(t, inputs[0])
            if numel:
                assert (inputs[0].double() - ref).abs().max().item() < 0.1
    finally:
        cluster.close()
