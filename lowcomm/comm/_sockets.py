"""The socket loops under every lowcomm connection: whole buffers written and read by a deadline.

Sockets run in blocking mode with kernel timeouts (``SO_SNDTIMEO`` / ``SO_RCVTIMEO``) rather than
Python socket timeouts; see ``_set_kernel_timeout``. Used by ``_frames.Connection`` and
``shaper``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["recv_exact", "send_all", "send_all_parts"]

_TIMEVAL = struct.Struct("@ll")


def _set_kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    # Connections run in blocking mode with SO_RCVTIMEO / SO_SNDTIMEO instead of Python socket
    # timeouts: a Python timeout makes every recv a poll() plus a non-blocking recv that returns
    # whatever has arrived (one thread wake-up and GIL round trip per few KiB), whereas a blocking
    # recv with MSG_WAITALL fills a whole multi-MiB sub-chunk in one call. The two options are
    # independent, so a sending and a receiving thread keep their own deadlines.
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))
    )


def send_all(sock: socket.socket, data: Buffer, deadline: float) -> None:
    """Writes all of ``data`` to a blocking socket by ``deadline``.

    Raises ``TimeoutError`` past the deadline and ``OSError`` if the connection fails."""
    view = memoryview(data).cast("B")
    sent, total = 0, view.nbytes
    while sent < total:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"sent {sent} of {total} bytes before the deadline")
        _set_kernel_timeout(sock, socket.SO_SNDTIMEO, left)
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:  # SO_SNDTIMEO expired with nothing sent; the loop checks the time
            continue


def send_all_parts(sock: socket.socket, buffers: Sequence[Buffer], deadline: float) -> None:
    """Like ``send_all`` for the concatenation of ``buffers``, written with ``sendmsg`` so that
    a frame header and its payload leave in one system call (no separate tiny segment)."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    while views:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("send ran past its deadline")
        _set_kernel_timeout(sock, socket.SO_SNDTIMEO, left)
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError:  # SO_SNDTIMEO expired with nothing sent
            continue
        _advance(views, sent)


def _advance(views: list[memoryview], nbytes: int) -> None:
    """Drops the first ``nbytes`` of ``views`` (in place): what one partial send or recv moved."""
    while nbytes and views:
        if nbytes >= views[0].nbytes:
            nbytes -= views[0].nbytes
            views.pop(0)
        else:
            views[0] = views[0][nbytes:]
            nbytes = 0


_SO_RCVLOWAT: int | None = getattr(socket, "SO_RCVLOWAT", None)


def recv_exact(
    sock: socket.socket, views: Sequence[memoryview], deadline: float, *, lowat: int = 0
) -> int:
    """Fills ``views`` in order from a blocking socket by ``deadline`` (one ``recvmsg_into`` with
    MSG_WAITALL when nothing goes wrong); returns the bytes received, which is fewer than their
    total only if the peer closed the connection.

    ``lowat`` > 0 (bulk data): instead of MSG_WAITALL, each call sets SO_RCVLOWAT to
    ``min(lowat, half the bytes still missing)``, so the kernel wakes this thread once that much
    has arrived rather than for every segment. On loopback that cuts the sending side's CPU (its
    softirq does the wake-ups) and some on this side. Why half: within one call the kernel keeps
    the mark after a partial copy (it copies early when the receive window fills), and wakes
    again only once another ``mark`` bytes are buffered. The call returns as soon as it has
    copied ``mark`` bytes, so a stall would need more than ``missing - mark`` bytes copied but
    fewer than ``mark``, impossible while ``mark <= missing / 2``. The mark is reset to 1 on
    return, so that later small reads on the socket are woken as usual.

    Raises ``TimeoutError`` past the deadline and ``OSError`` if the connection fails."""
    pending = [v for v in views if v.nbytes]
    got = 0
    use_lowat = lowat > 0 and _SO_RCVLOWAT is not None
    flags = 0 if use_lowat else socket.MSG_WAITALL
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"received {got} bytes before the deadline")
            _set_kernel_timeout(sock, socket.SO_RCVTIMEO, left)
            if use_lowat:
                assert _SO_RCVLOWAT is not None
                missing = sum(v.nbytes for v in pending)
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, max(1, min(lowat, missing // 2)))
            try:
                if len(pending) == 1:
                    n = sock.recv_into(pending[0], pending[0].nbytes, flags)
                else:
                    n = sock.recvmsg_into(pending, 0, flags)[0]
            except BlockingIOError:  # SO_RCVTIMEO expired with nothing received
                continue
            if n == 0:
                break
            got += n
            _advance(pending, n)
    finally:
        if use_lowat:
            assert _SO_RCVLOWAT is not None
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, 1)
    return got
