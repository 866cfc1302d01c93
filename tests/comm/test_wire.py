"""Framing and authentication of lowcomm connections: round trips, wrong tokens, hostile bytes."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lowcomm.comm import _frames, _handshake
from lowcomm.comm.errors import (
    AuthenticationError,
    CommError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
    TruncatedFrameError,
)
from tests._raw_socket import read_exact
from tests._tokens import OTHER_TOKEN, TOKEN

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


class _Result:
    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


def _in_thread(fn: Callable[[], Any]) -> _Result:
    result = _Result()

    def run() -> None:
        try:
            result.value = fn()
        except BaseException as exc:
            result.error = exc
        finally:
            result.done.set()

    threading.Thread(target=run, daemon=True).start()
    return result


def _accept_in_thread(
    listener: socket.socket, *, token: bytes | None, timeout_s: float = 10, **kw: Any
) -> _Result:
    def run() -> Any:
        client, _ = listener.accept()
        return _handshake.accept(
            client, token=token, hello={"side": "acceptor"}, timeout_s=timeout_s, **kw
        )

    return _in_thread(run)


def _connected_pair(
    listener: socket.socket, token: bytes | None = TOKEN, **kw: Any
) -> tuple[_frames.Connection, _frames.Connection]:
    acc = _accept_in_thread(listener, token=token, **kw)
    conn, their = _handshake.connect(
        listener.getsockname(), token=token, hello={"side": "connector"}, timeout_s=10, **kw
    )
    assert acc.done.wait(10)
    assert acc.error is None, acc.error
    server, their_hello = acc.value
    assert their == {"side": "acceptor"}
    assert their_hello == {"side": "connector"}
    return conn, server


def _raw_frame(kind: int, payload: bytes, *, length: int | None = None, version: int = 1) -> bytes:
    n = len(payload) if length is None else length
    return _frames.HEADER.pack(_frames.MAGIC, version, kind, 0, 0, 0, n) + payload


def test_frames_round_trip_with_kind_tag_and_split_payloads(listener: socket.socket) -> None:
    conn, server = _connected_pair(listener)
    conn.send_frame(70, [b"abc", bytearray(b"def"), memoryview(b"ghi")], tag=2**63 + 5, timeout_s=5)
    frame = server.recv_frame(timeout_s=5)
    assert (frame.kind, frame.tag, frame.payload) == (70, 2**63 + 5, b"abcdefghi")
    server.send_json(71, {"x": [1, 2.5, "y"]}, tag=3, timeout_s=5)
    assert conn.recv_json(timeout_s=5) == (71, 3, {"x": [1, 2.5, "y"]})
    conn.send_frame(72, timeout_s=5)  # empty payload
    assert server.recv_frame(timeout_s=5).payload == b""
    conn.close()
    server.close()


def test_large_payload_is_received_straight_into_a_preallocated_buffer(
    listener: socket.socket,
) -> None:
    conn, server = _connected_pair(listener)
    data = bytes(range(256)) * 40_000  # 10 MB, sent from another thread while we receive
    sender = _in_thread(lambda: conn.send_frame(80, memoryview(data), tag=9, seq=7, timeout_s=10))
    header = server.recv_header(timeout_s=10)
    assert (header.kind, header.tag, header.seq, header.length) == (80, 9, 7, len(data))
    out = bytearray(header.length)
    server.recv_into(out, timeout_s=10)
    assert sender.done.wait(10) and sender.error is None
    assert out == data
    # Byte counters agree on both ends (handshake included) and cover the payload.
    assert conn.tx_bytes == server.rx_bytes > len(data)
    conn.close()
    server.close()


def test_connector_with_wrong_token_is_rejected_with_a_clear_error(listener: socket.socket) -> None:
    acc = _accept_in_thread(listener, token=TOKEN)
    with pytest.raises(AuthenticationError, match=r"run token rejected by 127\.0\.0\.1"):
        _handshake.connect(listener.getsockname(), token=OTHER_TOKEN, hello={}, timeout_s=10)
    assert acc.done.wait(10)
    # The acceptor never read a hello; it ends with an error, not a crash.
    assert isinstance(acc.error, CommError)


def test_acceptor_with_wrong_token_cannot_impersonate_the_run(listener: socket.socket) -> None:
    # A listener that does not know the token cannot verify the connector's proof: it refuses
    # the connection before the hello (sent only after both proofs) could reach it.
    acc = _accept_in_thread(listener, token=OTHER_TOKEN)
    with pytest.raises(AuthenticationError, match="run token rejected by"):
        _handshake.connect(listener.getsockname(), token=TOKEN, hello={"secret": 1}, timeout_s=10)
    assert acc.done.wait(10)
    assert isinstance(acc.error, CommError)


def test_missing_token_on_either_side_is_refused(listener: socket.socket) -> None:
    acc = _accept_in_thread(listener, token=TOKEN)
    with pytest.raises(AuthenticationError, match="requires a run token"):
        _handshake.connect(listener.getsockname(), token=None, hello={}, timeout_s=10)
    assert acc.done.wait(10) and isinstance(acc.error, AuthenticationError)
    acc = _accept_in_thread(listener, token=None)
    with pytest.raises(AuthenticationError, match="uses no run token"):
        _handshake.connect(listener.getsockname(), token=TOKEN, hello={}, timeout_s=10)
    assert acc.done.wait(10) and isinstance(acc.error, CommError)


def test_no_token_on_both_sides_connects(listener: socket.socket) -> None:
    conn, server = _connected_pair(listener, token=None)
    conn.send_frame(64, b"x", timeout_s=5)
    assert server.recv_frame(timeout_s=5).payload == b"x"
    conn.close()
    server.close()


def test_garbage_bytes_before_authentication_are_a_protocol_error(listener: socket.socket) -> None:
    acc = _accept_in_thread(listener, token=TOKEN)
    with socket.create_connection(listener.getsockname()) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
        assert acc.done.wait(10)
        assert isinstance(acc.error, ProtocolError)
        assert "not a lowcomm frame" in str(acc.error)
        raw.settimeout(5)
        assert raw.recv(100) == b""  # the acceptor closed the connection


def test_oversized_length_claim_before_authentication_reads_nothing(
    listener: socket.socket,
) -> None:
    acc = _accept_in_thread(listener, token=TOKEN)
    with socket.create_connection(listener.getsockname()) as raw:
        raw.sendall(_raw_frame(_handshake.KIND_AUTH_HELLO, b"", length=2**62))
        assert acc.done.wait(10)
        assert isinstance(acc.error, ProtocolError)
        assert "over the bound" in str(acc.error)


def test_oversized_length_claim_after_authentication_closes_the_connection(
    listener: socket.socket,
) -> None:
    # Raw frames written past the Connection: an unprotected pair (a protected one would refuse
    # them as unsealed, test_security.py).
    conn, server = _connected_pair(listener, max_frame_bytes=1 << 20, encryption=False)
    conn._sock.sendall(_raw_frame(64, b"", length=(1 << 20) + 1))
    with pytest.raises(ProtocolError, match="over the bound"):
        server.recv_frame(timeout_s=5)
    assert server.closed
    with pytest.raises(PeerFailureError):  # later calls fail at once, no hang
        server.recv_frame(timeout_s=5)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        conn.send_frame(64, bytes((1 << 20) + 1), timeout_s=5)
    conn.close()


def test_other_wire_version_is_named_in_the_error(listener: socket.socket) -> None:
    conn, server = _connected_pair(listener)
    conn._sock.sendall(_raw_frame(64, b"hi", version=99))
    with pytest.raises(ProtocolError, match="wire version 99"):
        server.recv_frame(timeout_s=5)
    conn.close()


def test_malformed_handshake_json_is_a_protocol_error(listener: socket.socket) -> None:
    acc = _accept_in_thread(listener, token=TOKEN)
    with socket.create_connection(listener.getsockname()) as raw:
        raw.sendall(_raw_frame(_handshake.KIND_AUTH_HELLO, b"{not json"))
        assert acc.done.wait(10)
        assert isinstance(acc.error, ProtocolError)
    acc = _accept_in_thread(listener, token=TOKEN)
    with socket.create_connection(listener.getsockname()) as raw:
        raw.sendall(
            _raw_frame(
                _handshake.KIND_AUTH_HELLO,
                b'{"v": 2, "auth": true, "encryption": true, "nonce": "zz"}',
            )
        )
        assert acc.done.wait(10)
        assert isinstance(acc.error, ProtocolError)
        assert "nonce" in str(acc.error)


def test_bulk_receive_with_a_low_water_mark_gets_every_frame_of_a_trickling_stream(
    listener: socket.socket,
) -> None:
    from lowcomm.comm.shaper import Shaper

    # A paced sender with latency: data trickles in, the receive window fills before the mark is
    # reached and the kernel copies early. The last frame has nothing after it, so a mark left
    # above what it still owes would wait out the whole timeout (it did, before the mark was
    # capped at half the missing bytes); the generous timeout only catches that hang.
    shaper = Shaper(bandwidth_bps=16e6, latency_ms=20)
    conn, server = _connected_pair(listener, shaper=shaper)
    frames = [bytes([i]) * 250_000 for i in range(4)]
    sender = _in_thread(
        lambda: [conn.send_frame(80, f, seq=i, timeout_s=20) for i, f in enumerate(frames)]
    )
    for i, expected in enumerate(frames):
        out = bytearray(len(expected))
        start = time.monotonic()
        header = server.recv_frame_into(out, timeout_s=10, lowat=1 << 20)
        assert header.seq == i and out == expected
        # A stalled wake-up completes only when the timeout cuts the read short (~10 s); the
        # frame itself needs ~0.15 s, so half the timeout separates the two on any machine.
        assert time.monotonic() - start < 5, f"frame {i} waited out its receive timeout"
    assert sender.done.wait(10) and sender.error is None
    # The mark was reset: a small frame after the bulk ones is still woken for.
    conn.send_frame(81, b"tail", timeout_s=5)
    assert server.recv_frame(timeout_s=10).payload == b"tail"
    conn.close()
    server.close()


def test_bulk_receive_with_a_low_water_mark_reports_a_peer_closing_mid_frame(
    listener: socket.socket,
) -> None:
    conn, server = _connected_pair(listener, encryption=False)
    conn._sock.sendall(_raw_frame(64, b"x" * 1000, length=100_000))
    conn.close()
    with pytest.raises(TruncatedFrameError):
        server.recv_frame_into(bytearray(100_000), timeout_s=5, lowat=1 << 20)


def test_truncated_frame_from_a_peer_closing_mid_frame(listener: socket.socket) -> None:
    conn, server = _connected_pair(listener, encryption=False)
    conn._sock.sendall(_raw_frame(64, b"0123456789", length=100))
    conn.close()
    with pytest.raises(TruncatedFrameError, match="middle of a frame") as info:
        server.recv_frame(timeout_s=5)
    # A truncated frame is both: the peer is gone, and the frame is incomplete.
    assert isinstance(info.value, PeerFailureError)
    assert isinstance(info.value, ProtocolError)


def test_truncated_header_is_a_truncated_frame(listener: socket.socket) -> None:
    conn, server = _connected_pair(listener)
    conn._sock.sendall(_raw_frame(64, b"")[:10])
    conn.close()
    with pytest.raises(TruncatedFrameError):
        server.recv_frame(timeout_s=5)


def test_clean_close_between_frames_is_a_peer_failure(listener: socket.socket) -> None:
    conn, server = _connected_pair(listener)
    conn.send_frame(64, b"last", timeout_s=5)
    conn.close()
    assert server.recv_frame(timeout_s=5).payload == b"last"
    with pytest.raises(PeerFailureError, match="closed the connection") as info:
        server.recv_frame(timeout_s=5)
    assert not isinstance(info.value, ProtocolError)


def test_receive_times_out_within_its_bound(listener: socket.socket) -> None:
    conn, server = _connected_pair(listener)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match="timed out"):
        server.recv_frame(timeout_s=0.3)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 5
    conn.close()


def test_send_to_a_peer_that_stops_reading_times_out(listener: socket.socket) -> None:
    conn, server = _connected_pair(listener)
    big = bytes(64 << 20)  # far more than the socket buffers hold
    start = time.monotonic()
    with pytest.raises(CommTimeoutError):
        conn.send_frame(64, big, timeout_s=0.5)
    assert time.monotonic() - start < 10
    conn.close()
    server.close()


def test_silent_client_makes_accept_time_out(listener: socket.socket) -> None:
    acc = _accept_in_thread(listener, token=TOKEN, timeout_s=0.3)
    with socket.create_connection(listener.getsockname()):
        assert acc.done.wait(10)
        assert isinstance(acc.error, CommTimeoutError)


def test_connect_times_out_when_the_listener_never_answers(listener: socket.socket) -> None:
    # The kernel completes the TCP handshake (backlog) but nobody runs the lowcomm handshake.
    start = time.monotonic()
    with pytest.raises(CommTimeoutError):
        _handshake.connect(listener.getsockname(), token=TOKEN, hello={}, timeout_s=0.3)
    assert time.monotonic() - start < 5


def test_connect_to_a_closed_port_is_a_peer_failure() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = sock.getsockname()
    sock.close()
    with pytest.raises(PeerFailureError, match="cannot connect"):
        _handshake.connect(address, token=TOKEN, hello={}, timeout_s=5)


def test_bad_arguments_are_value_errors(listener: socket.socket) -> None:
    with pytest.raises(ValueError, match="token"):
        _handshake.normalize_token(b"")
    conn, server = _connected_pair(listener)
    with pytest.raises(ValueError, match="kind"):
        conn.send_frame(300, b"", timeout_s=1)
    with pytest.raises(ValueError, match="tag"):
        conn.send_frame(64, b"", tag=-1, timeout_s=1)
    conn.close()
    server.close()


def test_header_layout_is_stable() -> None:
    # Peers of different lowcomm releases rely on this layout to detect a version mismatch.
    assert _frames.HEADER.size == 28
    assert _frames.HEADER.pack(b"LCMW", 1, 2, 0, 3, 4, 5) == (
        b"LCMW" + struct.pack("!BBHIQQ", 1, 2, 0, 3, 4, 5)
    )


# ----- sealed frames of several records (see _aead) ----------------------------------------------


def _payload_over_records() -> tuple[list[Any], bytes]:
    """A payload of about 2.5 records in three views whose boundaries fall inside records."""
    from lowcomm.comm._aead import RECORD_BYTES

    a = bytes(range(256)) * (2 * RECORD_BYTES // 256 + 7)  # two records and a bit
    b = bytearray(b"\x5a" * 1000)
    c = memoryview(bytes(reversed(a)))[: RECORD_BYTES // 2 + 3]
    return [a, b, c], a + bytes(b) + bytes(c)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_frame_of_several_records_round_trips_on_every_receive_path(
    listener: socket.socket, overlap: bool
) -> None:
    conn, server = _connected_pair(listener)
    conn.overlap_cipher = server.overlap_cipher = overlap
    parts, whole = _payload_over_records()
    conn.send_frame(70, parts, tag=9, seq=4, timeout_s=5)
    frame = server.recv_frame(timeout_s=5)
    assert (frame.kind, frame.tag, frame.seq, frame.payload) == (70, 9, 4, whole)
    conn.send_frame(71, parts, timeout_s=5)
    out = bytearray(len(whole))
    server.recv_frame_into(out, timeout_s=5, lowat=1 << 20)
    assert out == whole
    conn.send_frame(72, parts, timeout_s=5)
    header = server.recv_header(timeout_s=5)
    out = bytearray(header.length)
    server.recv_into(out, timeout_s=5)
    assert out == whole
    # A control frame after them still opens: the record counters stayed in step.
    server.send_json(73, {"ok": True}, timeout_s=5)
    assert conn.recv_json(timeout_s=5) == (73, 0, {"ok": True})
    conn.close()
    server.close()


def test_a_frame_of_more_records_than_buffer_slots_round_trips_and_a_late_record_is_checked(
    listener: socket.socket,
) -> None:
    """The records of a long frame reuse the direction's buffer slots (``RECORD_SLOTS``) while
    the helper seals or opens the others: the payload still arrives whole and in order, and a
    record modified after the slots were reused still fails authentication."""
    from lowcomm.comm._aead import RECORD_BYTES, RECORD_SLOTS, TAG_BYTES

    conn, server = _connected_pair(listener)
    assert conn.overlap_cipher and server.overlap_cipher
    count = RECORD_SLOTS + 2
    payload = bytes(range(251)) * ((count - 1) * RECORD_BYTES // 251 + 1000)
    assert -(-len(payload) // RECORD_BYTES) == count
    out = bytearray(len(payload))
    receiver = _in_thread(lambda: server.recv_frame_into(out, timeout_s=10, lowat=1 << 20))
    conn.send_frame(70, payload, timeout_s=10)
    assert receiver.done.wait(10) and receiver.error is None, receiver.error
    assert out == payload
    # The same frame again, read raw, its second-to-last record's ciphertext changed, replayed.
    sizes = [_frames.HEADER.size] + [RECORD_BYTES + TAG_BYTES] * (count - 1)
    sizes.append(len(payload) - (count - 1) * RECORD_BYTES + TAG_BYTES)
    server._sock.settimeout(5)
    reader = _in_thread(lambda: [read_exact(server._sock, n) for n in sizes])
    conn.send_frame(71, payload, timeout_s=10)
    assert reader.done.wait(10) and reader.error is None, reader.error
    head, *recs = reader.value
    recs[count - 2] = bytes([recs[count - 2][0] ^ 1]) + recs[count - 2][1:]
    server._sock.settimeout(None)
    # Both counters are one frame on: rewind the receiver's, as if the first copy were lost.
    server._rx_cipher._counter -= count  # type: ignore[union-attr]
    replay = _in_thread(lambda: conn._sock.sendall(head + b"".join(recs)))
    out = bytearray(len(payload))
    with pytest.raises(ProtocolError, match="failed authentication"):
        server.recv_frame_into(out, timeout_s=10, lowat=1 << 20)
    assert server.closed
    conn.close()
    assert replay.done.wait(10)


@pytest.mark.parametrize("attack", ["swap-records", "drop-record", "flip-last-tag", "truncate"])
def test_records_of_a_frame_reordered_dropped_or_modified_fail_authentication(
    listener: socket.socket, attack: str
) -> None:
    from lowcomm.comm._aead import RECORD_BYTES, TAG_BYTES

    conn, server = _connected_pair(listener)
    parts, whole = _payload_over_records()
    # The sealed frame as it leaves (read meanwhile: it is larger than the socket buffers):
    # header, then three records (two full, one short).
    full = RECORD_BYTES + TAG_BYTES
    sizes = [_frames.HEADER.size, full, full, len(whole) - 2 * RECORD_BYTES + TAG_BYTES]
    server._sock.settimeout(5)
    reader = _in_thread(lambda: [read_exact(server._sock, n) for n in sizes])
    conn.send_frame(70, parts, timeout_s=5)
    assert reader.done.wait(10) and reader.error is None, reader.error
    head, *recs = reader.value
    if attack == "swap-records":
        body = recs[1] + recs[0] + recs[2]
    elif attack == "drop-record":  # the third record moves up: the lengths still add up
        body = recs[0] + recs[2] + recs[1][: len(recs[2])]
    elif attack == "flip-last-tag":
        body = recs[0] + recs[1] + recs[2][:-1] + bytes([recs[2][-1] ^ 1])
    else:  # the frame ends before its last record: the receiver must not apply a prefix
        body = recs[0] + recs[1] + recs[2][:100]
    server._sock.settimeout(None)
    conn._sock.sendall(head + body)
    if attack == "truncate":
        conn._sock.shutdown(socket.SHUT_WR)
    with pytest.raises((ProtocolError, TruncatedFrameError)):
        server.recv_frame(timeout_s=5)
    assert server.closed
    conn.close()


@pytest.mark.timeout(120)
def test_a_local_abort_mid_frame_is_a_peer_failure_and_the_cipher_is_never_shared(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With several records queued on the open helper, a job that runs on the caller's thread
    # after the connection closed must wait for the queued ones: two threads opening with one
    # cipher take nonces out of order, and a local abort then reads as tampering on the path.
    import os
    import random

    from lowcomm.comm import _aead

    busy: dict[int, set[str]] = {}
    overlaps: list[str] = []
    real_open = _aead.FrameCipher.open_into

    def open_into(self: Any, *args: Any, **kwargs: Any) -> Any:
        me = threading.current_thread().name
        users = busy.setdefault(id(self), set())
        if users - {me}:
            overlaps.append(me)
        users.add(me)
        try:
            return real_open(self, *args, **kwargs)
        finally:
            users.discard(me)

    monkeypatch.setattr(_aead.FrameCipher, "open_into", open_into)
    rnd = random.Random(1)
    data = os.urandom(13 * _aead.RECORD_BYTES + 17)
    tampering: list[str] = []
    for _ in range(40):
        conn, server = _connected_pair(listener)
        out = bytearray(len(data))
        rx = _in_thread(lambda s=server, o=out: s.recv_frame_into(o, timeout_s=10, lowat=1 << 20))
        tx = _in_thread(lambda c=conn: c.send_frame(70, data, timeout_s=10))
        time.sleep(rnd.uniform(0, 0.006))
        server.abort()  # this side closes: nothing on the path was modified
        assert rx.done.wait(10) and tx.done.wait(12)
        if type(rx.error) is ProtocolError:
            tampering.append(str(rx.error))
        conn.close()
        server.close()
    assert not overlaps, f"{len(overlaps)} opens ran on one cipher at once"
    assert not tampering, f"{len(tampering)}/40 local aborts reported as: {tampering[0]}"


@pytest.mark.timeout(60)
def test_frames_around_the_buffer_slot_count_round_trip_whole(listener: socket.socket) -> None:
    # The records of a frame take the direction's RECORD_SLOTS buffer slots in turn: frames of
    # one record less, exactly as many, and one more than the slots, each a byte short, exact and
    # a byte over, arrive whole and in order, with and without a low-water mark, back to back.
    from lowcomm.comm._aead import RECORD_BYTES, RECORD_SLOTS

    conn, server = _connected_pair(listener)
    sizes = [
        records * RECORD_BYTES + extra
        for records in (RECORD_SLOTS - 1, RECORD_SLOTS, RECORD_SLOTS + 1)
        for extra in (-1, 0, 1)
    ]
    try:
        for i, size in enumerate(sizes):
            payload = bytes((i + j) % 251 for j in range(251)) * (size // 251) + b"x" * (size % 251)
            out = bytearray(size)
            lowat = (1 << 20) if i % 2 else 0
            rx = _in_thread(lambda o=out, w=lowat: server.recv_frame_into(o, timeout_s=10, lowat=w))
            conn.send_frame(70 + i, payload, timeout_s=10)
            assert rx.done.wait(10) and rx.error is None, (size, rx.error)
            assert rx.value.kind == 70 + i and out == payload, size
    finally:
        conn.close()
        server.close()
