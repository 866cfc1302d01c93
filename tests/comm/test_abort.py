"""How a connection ends: ``Connection.abort`` wakes a peer blocked sending into this side's full
receive window at once (an RST), even when a receiving thread here reads the queued bytes between
abort's shutdown and its close; ``close`` stays graceful, so the last frames sent arrive.

Without SO_LINGER (on, 0) in ``abort``, that read left nothing unread, the close sent no RST, and
the peer's send waited out its whole timeout: a FIN does not wake a send blocked on a zero window.
These tests run the op timeout at 60 s under a 20 s test timeout, so a regression hangs the test
(and fails it) instead of racing a timing threshold.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lowcomm.comm._frames import KIND_USER_MIN, Connection
from lowcomm.comm.errors import PeerFailureError

pytestmark = pytest.mark.timeout(20)

OP_TIMEOUT_S = 60.0
FRAME_BYTES = 64 << 20  # far more than the kernel's buffers hold: the sender blocks
# Linux ioctl: bytes in a socket's send queue not yet sent (held back by the peer's window).
_SIOCOUTQNSD = 0x894B


def _ioctl_int(sock: socket.socket, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])


class _RacingSocket(socket.socket):
    """The aborting side's socket. On the first ``shutdown`` (abort's), releases the receiving
    thread (``go``) and waits for it to finish before returning: the thread reads the queued
    bytes after the shutdown and before abort's close, the race this test forces. Records the
    bytes left unread when the socket is closed (``unread_at_close``): with some, Linux sends an
    RST whatever the linger setting."""

    go: threading.Event
    done: threading.Event
    unread_at_close: int | None

    def arm(self) -> None:
        self.go, self.done, self.unread_at_close = threading.Event(), threading.Event(), None

    def shutdown(self, how: int) -> None:
        super().shutdown(how)
        if self.go.is_set():
            return
        self.go.set()
        assert self.done.wait(OP_TIMEOUT_S)

    def close(self) -> None:
        if self.unread_at_close is None and self.fileno() >= 0:
            self.unread_at_close = _ioctl_int(self, termios.FIONREAD)
        super().close()


def _pair(*, sndbuf: int = 0, rcvbuf: int = 0) -> tuple[Connection, Connection, _RacingSocket]:
    """(sending side, receiving and aborting side, the latter's socket), unprotected, over
    loopback; ``sndbuf`` / ``rcvbuf``: the sending / receiving side's kernel buffer (0: default)."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        if rcvbuf:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        a = socket.socket()
        if sndbuf:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        a.connect(server.getsockname())
        fd = server.accept()[0].detach()
    finally:
        server.close()
    b = _RacingSocket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    b.arm()
    return Connection(a, peer="b"), Connection(b, peer="a"), b


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection, _RacingSocket]]:
    a, b, sock = _pair()
    yield a, b, sock
    a.close()
    b.close()


def _wait_for_zero_window(sender: socket.socket, receiver: socket.socket) -> None:
    """Until the sender holds bytes the window does not let out and the receiver's queue stopped
    growing: the sender is blocked in send on a zero window (bounded by the test's timeout)."""
    last, stable = -1, 0
    while stable < 3:
        time.sleep(0.02)
        queued = _ioctl_int(receiver, termios.FIONREAD)
        held = _ioctl_int(sender, _SIOCOUTQNSD)
        stable = stable + 1 if queued == last and queued > 0 and held > 0 else 0
        last = queued


def test_abort_wakes_a_peer_blocked_sending_even_if_the_queue_was_read_meanwhile(
    pair: tuple[Connection, Connection, _RacingSocket],
) -> None:
    a, b, b_sock = pair
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            a.send_frame(KIND_USER_MIN, bytes(FRAME_BYTES), timeout_s=OP_TIMEOUT_S)
        except BaseException as exc:
            outcome["send"] = exc

    def receive() -> None:
        b_sock.go.wait()
        try:
            b.recv_frame(timeout_s=OP_TIMEOUT_S, max_bytes=FRAME_BYTES)
        except BaseException as exc:
            outcome["recv"] = exc
        finally:
            b_sock.done.set()

    sender = threading.Thread(target=send, daemon=True)
    receiver = threading.Thread(target=receive, daemon=True)
    sender.start()
    receiver.start()
    _wait_for_zero_window(a._sock, b_sock)
    b.abort()
    receiver.join(OP_TIMEOUT_S)
    # The fault fired: the receiving thread read after the shutdown and left nothing unread.
    assert b_sock.go.is_set() and b_sock.done.is_set()
    assert b.rx_bytes > 0 and b_sock.unread_at_close == 0
    assert isinstance(outcome.get("recv"), PeerFailureError)
    # Without the RST this join outlasts the test's timeout (the send waits its 60 s).
    sender.join(OP_TIMEOUT_S)
    assert not sender.is_alive()
    assert isinstance(outcome.get("send"), PeerFailureError), outcome.get("send")
    assert a.closed


def test_close_stays_graceful_the_last_frame_arrives_whole() -> None:
    # A small receive window on the reading side and room on the sending side: the whole frame
    # is handed to the kernel, most of it still held in the sender's queue when it closes.
    a, b, b_sock = _pair(sndbuf=1 << 20, rcvbuf=8192)
    b_sock.go.set()  # no race on this socket
    try:
        room = a._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        payload = bytes(range(256)) * (room // 8 // 256)
        a.send_frame(KIND_USER_MIN, payload, timeout_s=OP_TIMEOUT_S)
        held = _ioctl_int(a._sock, _SIOCOUTQNSD)
        a.close()
        assert held > 0  # the close found bytes not yet sent: an abortive one would drop them
        frame = b.recv_frame(timeout_s=OP_TIMEOUT_S, max_bytes=len(payload))
        assert frame.payload == payload
        # Then the end of the stream, not a reset.
        with pytest.raises(PeerFailureError, match="closed the connection;"):
            b.recv_frame(timeout_s=OP_TIMEOUT_S)
    finally:
        a.close()
        b.close()
