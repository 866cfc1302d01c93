"""A user-space WAN emulator for lowcomm's own sockets: token-bucket bandwidth plus one-way latency.

One ``Shaper`` models one uplink: every connection it is attached to (pass the same shaper to
``PeerListener``, ``connect_ring`` and ``_handshake.connect``) shares its ``bandwidth_bps``. Only
sends are shaped; in a ring every peer's uplink is shaped, so every hop is. Tools that open their own
sockets (Gloo) need kernel shaping (``tc tbf``) instead.

Bandwidth: a virtual-clock token bucket. Each piece of at most ``piece_bytes`` reserves
``piece / rate`` seconds of link time and may leave once the link's backlog is under
``burst_bytes``. Latency: with ``latency_ms > 0`` a per-connection pump thread holds each piece until
``latency_ms`` after its paced departure, so a long fat pipe keeps ``rate * latency`` bytes in flight
(like a real link) instead of adding the latency to every send.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lowcomm.comm._frames import send_all
from lowcomm.comm.errors import CommTimeoutError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Shaper"]

logger = logging.getLogger(__name__)


class Shaper:
    """Token-bucket bandwidth limit and added one-way latency for lowcomm's sends.

    Thread-safe: any number of connections and threads may share one shaper.

    Args:
        bandwidth_bps: link rate in bits per second (``None``: unlimited, latency only).
        latency_ms: one-way latency added to every byte, in milliseconds.
        burst_bytes: how far the bucket may run ahead of the link; default 0.5 ms of traffic
            (at least 16 KiB), so that measured throughput cannot exceed the rate noticeably.
        piece_bytes: sends are paced in pieces of at most this size; default 1 ms of traffic
            (between 64 KiB and 1 MiB). Every piece costs a sleep and a system call, so pieces
            much smaller than that cost CPU (which a loopback benchmark shares with the work it
            measures) without making the average rate any more exact.
    """

    def __init__(
        self,
        *,
        bandwidth_bps: float | None = None,
        latency_ms: float = 0.0,
        burst_bytes: int | None = None,
        piece_bytes: int | None = None,
    ) -> None:
        if bandwidth_bps is not None and not bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be > 0 or None, got {bandwidth_bps}")
        if not latency_ms >= 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        self._rate = bandwidth_bps / 8.0 if bandwidth_bps is not None else None
        if piece_bytes is None:
            piece_bytes = (
                min(1 << 20, max(64 * 1024, int(self._rate * 0.001))) if self._rate else 64 * 1024
            )
        if piece_bytes < 1:
            raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
        self.bandwidth_bps = bandwidth_bps
        self.latency_ms = latency_ms
        self.piece_bytes = piece_bytes
        if burst_bytes is None:
            burst_bytes = max(16 * 1024, int(self._rate * 0.0005)) if self._rate else 0
        if burst_bytes < 0:
            raise ValueError(f"burst_bytes must be >= 0, got {burst_bytes}")
        self.burst_bytes = burst_bytes
        self._lock = threading.Lock()
        self._link_free_at = 0.0  # monotonic time at which every reserved byte has left
        self.sent_bytes = 0

    def __repr__(self) -> str:
        return f"Shaper(bandwidth_bps={self.bandwidth_bps}, latency_ms={self.latency_ms})"

    def reserve(self, nbytes: int) -> float:
        """Books ``nbytes`` of link time; returns the monotonic time they may leave. Non-blocking."""
        now = time.monotonic()
        with self._lock:
            self.sent_bytes += nbytes
            if self._rate is None:
                return now
            start = max(now, self._link_free_at)
            self._link_free_at = start + nbytes / self._rate
            return max(now, self._link_free_at - self.burst_bytes / self._rate)

    def attach(self, sock: socket.socket, *, peer: str) -> _ShapedSender:
        """Wraps a socket's sending side. Called by ``_frames.Connection``; not for users."""
        return _ShapedSender(self, sock, peer)


def _sleep_until(when: float, deadline: float, peer: str) -> None:
    delay = when - time.monotonic()
    if delay <= 0:
        return
    if when > deadline:
        time.sleep(max(0.0, deadline - time.monotonic()))
        raise CommTimeoutError(f"sending to {peer} through the shaper timed out")
    time.sleep(delay)


class _ShapedSender:
    """The sending side of one shaped connection (see ``Shaper``)."""

    def __init__(self, shaper: Shaper, sock: socket.socket, peer: str) -> None:
        self._shaper = shaper
        self._sock = sock
        self._peer = peer
        self._delay_s = shaper.latency_ms / 1000.0
        self._queue: collections.deque[tuple[float, float, bytes] | None] = collections.deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._pump: threading.Thread | None = None
        if self._delay_s > 0:
            self._pump = threading.Thread(
                target=self._run_pump, name=f"lowcomm-shaper-{peer}", daemon=True
            )
            self._pump.start()

    def send(self, buffers: Sequence[Buffer], deadline: float) -> None:
        piece = self._shaper.piece_bytes
        for buf in buffers:
            mv = memoryview(buf).cast("B")
            for off in range(0, mv.nbytes, piece):
                part = mv[off : off + piece]
                leave_at = self._shaper.reserve(part.nbytes)
                _sleep_until(leave_at, deadline, self._peer)
                if self._pump is None:
                    send_all(self._sock, part, deadline)
                else:
                    self._enqueue(leave_at + self._delay_s, deadline, bytes(part))

    def _enqueue(self, release_at: float, deadline: float, data: bytes) -> None:
        with self._cond:
            if self._error is not None:
                raise OSError(f"shaped link to {self._peer} failed: {self._error}")
            self._queue.append((release_at, deadline + self._delay_s, data))
            self._cond.notify()

    def _run_pump(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
            if item is None:
                return
            release_at, deadline, data = item
            try:
                delay = release_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                send_all(self._sock, data, deadline)
            except OSError as exc:  # includes TimeoutError; surfaced on the next send
                logger.info("shaped link to %s failed: %s", self._peer, exc)
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                return

    def close(self) -> None:
        """Lets bytes still in the emulated pipe arrive (as a real link would), then stops the
        pump. Bounded by the latency plus one second; after an abort the pump fails at once."""
        if self._pump is not None:
            with self._cond:
                self._queue.append(None)
                self._cond.notify()
            if threading.current_thread() is not self._pump:
                self._pump.join(timeout=self._delay_s + 1.0)
