"""The user-space WAN shaper really limits lowcomm's throughput and adds latency."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lowcomm.comm import _frames, _handshake
from lowcomm.comm.shaper import Shaper
from tests._tokens import TOKEN

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    yield sock
    sock.close()


def _pair(listener: socket.socket, shaper: Shaper) -> tuple[_frames.Connection, _frames.Connection]:
    box: dict[str, _frames.Connection] = {}

    def acc() -> None:
        client, _ = listener.accept()
        box["server"] = _handshake.accept(client, token=TOKEN, hello={}, timeout_s=10)[0]

    th = threading.Thread(target=acc, daemon=True)
    th.start()
    conn, _ = _handshake.connect(
        listener.getsockname(), token=TOKEN, hello={}, timeout_s=10, shaper=shaper
    )
    th.join(10)
    return conn, box["server"]


def _receive(server: _frames.Connection, count: int, arrivals: list[float]) -> None:
    for _ in range(count):
        server.recv_frame(timeout_s=30)
        arrivals.append(time.monotonic())


def test_bandwidth_limit_holds_a_2_mb_transfer_at_8_mbit_to_at_least_1_5_s(
    listener: socket.socket,
) -> None:
    shaper = Shaper(bandwidth_bps=8e6)  # 1 MB/s: 2 MB should take 2 s
    conn, server = _pair(listener, shaper)
    arrivals: list[float] = []
    reader = threading.Thread(target=_receive, args=(server, 8, arrivals), daemon=True)
    reader.start()
    start = time.monotonic()
    for _ in range(8):
        conn.send_frame(64, bytes(250_000), timeout_s=30)
    reader.join(30)
    elapsed = arrivals[-1] - start
    assert len(arrivals) == 8
    assert elapsed >= 1.5, f"2 MB at 8 Mbit/s arrived in {elapsed:.2f} s: not shaped"
    assert elapsed < 20  # generous: only proves the transfer completes
    assert shaper.sent_bytes >= 2_000_000
    conn.close()
    server.close()


def test_one_shaper_is_shared_by_every_connection_it_is_attached_to(
    listener: socket.socket,
) -> None:
    shaper = Shaper(bandwidth_bps=8e6)
    (c1, s1), (c2, s2) = _pair(listener, shaper), _pair(listener, shaper)
    arrivals: list[float] = []
    readers = [
        threading.Thread(target=_receive, args=(s, 4, arrivals), daemon=True) for s in (s1, s2)
    ]
    for r in readers:
        r.start()
    start = time.monotonic()
    senders = [
        threading.Thread(
            target=lambda c=c: [c.send_frame(64, bytes(250_000), timeout_s=30) for _ in range(4)],
            daemon=True,
        )
        for c in (c1, c2)
    ]
    for s in senders:
        s.start()
    for t in senders + readers:
        t.join(30)
    # 2 MB in total over one shared 1 MB/s uplink, although two connections carried it.
    assert len(arrivals) == 8
    assert max(arrivals) - start >= 1.5
    for c in (c1, s1, c2, s2):
        c.close()


def test_latency_delays_each_frame_without_serialising_a_stream(listener: socket.socket) -> None:
    shaper = Shaper(latency_ms=300)
    conn, server = _pair(listener, shaper)
    arrivals: list[float] = []
    reader = threading.Thread(target=_receive, args=(server, 20, arrivals), daemon=True)
    reader.start()
    start = time.monotonic()
    for _ in range(20):
        conn.send_frame(64, b"x" * 1000, timeout_s=10)
    reader.join(30)
    assert len(arrivals) == 20
    assert arrivals[0] - start >= 0.25, "the first frame arrived before the one-way latency"
    # Pipelined like a real link: 20 frames take about one latency, not 20 of them (6 s).
    assert arrivals[-1] - start < 4.0
    conn.close()
    server.close()


def test_send_through_the_shaper_times_out_instead_of_blocking() -> None:
    from lowcomm.comm.errors import CommTimeoutError

    a, b = socket.socketpair()
    shaper = Shaper(bandwidth_bps=8e3)  # 1 kB/s
    sender = shaper.attach(a, peer="test")
    start = time.monotonic()
    with pytest.raises(CommTimeoutError):
        sender.send([bytes(100_000)], time.monotonic() + 0.5)
    assert time.monotonic() - start < 5
    a.close()
    b.close()


def test_bad_shaper_settings_are_value_errors() -> None:
    with pytest.raises(ValueError, match="bandwidth_bps"):
        Shaper(bandwidth_bps=0)
    with pytest.raises(ValueError, match="latency_ms"):
        Shaper(latency_ms=-1)


def test_ring_all_reduce_over_shaped_links_is_exact_and_rate_limited() -> None:
    import torch

    from lowcomm.comm import PeerListener, Ring, connect_ring

    n, numel = 2, 250_000  # each peer sends 2 (n-1)/n * 1 MB = 1 MB through its uplink
    shapers = [Shaper(bandwidth_bps=16e6, latency_ms=20) for _ in range(n)]  # 2 MB/s each
    listeners = [PeerListener("127.0.0.1", 0, token=TOKEN, shaper=s) for s in shapers]
    addresses = [lst.address for lst in listeners]
    rings: dict[int, Ring] = {}
    inputs = [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(n)]
    ref = inputs[0] + inputs[1]

    def connect(r: int) -> None:
        rings[r] = connect_ring(
            listener=listeners[r],
            rank=r,
            addresses=addresses,
            ring_id="shaped",
            token=TOKEN,
            num_connections=2,
            shaper=shapers[r],
        )

    threads = [threading.Thread(target=connect, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors: list[BaseException] = []

    def reduce(r: int) -> None:
        try:
            rings[r].all_reduce(inputs[r], "sum", timeout_s=30)
        except BaseException as exc:
            errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=reduce, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    assert not errors, errors
    torch.testing.assert_close(inputs[0], ref)
    assert torch.equal(inputs[0], inputs[1])
    assert elapsed >= 0.35, f"1 MB per 2 MB/s uplink took {elapsed:.2f} s: not shaped"
    for ring in rings.values():
        ring.close()
    for lst in listeners:
        lst.close()
