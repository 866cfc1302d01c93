"""The connection router of a peer: accepts authenticated connections and routes them by purpose.

Every peer runs one ``PeerListener``; the ring (``connect_ring``), point-to-point transfers and
shared-state sync all receive their connections through it, each under its own ``purpose``.
Connections that have not authenticated yet are admitted by ``_handshake_slots.HandshakeSlots``: short
deadlines, caps per source and in total, the peers a ring waits for served before strangers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lowcomm.comm import _handshake
from lowcomm.comm._frames import DEFAULT_MAX_FRAME_BYTES, Connection
from lowcomm.comm._handshake_slots import HandshakeSlots, Slot
from lowcomm.comm.errors import CommError, CommTimeoutError
from lowcomm.comm.shaper import Shaper

__all__ = ["Handler", "PeerListener"]

logger = logging.getLogger(__name__)

Handler = Callable[[Connection, dict[str, Any]], None]


class PeerListener:
    """Accepts authenticated connections in the background and routes them by ``purpose``/``key``.

    A background thread accepts; each new connection runs the handshake in its own short-lived
    thread (bounded by ``handshake_timeout_s``), so a silent or hostile client delays nobody; at
    most ``max_handshakes`` run at once, ``max_handshakes_per_source`` from one host, and hosts
    named by ``expecting`` (or that authenticated before) take the slots of strangers
    (``_handshake_slots``). ``encryption``: see ``_handshake`` (both ends must agree). The
    connector's hello must carry ``"purpose"`` and ``"key"`` strings. A connection whose purpose has
    a handler (``set_handler``) is handed to it on the handshake thread; otherwise it waits in a
    queue for ``wait_for``. A failed handshake or a bad hello is logged and closed; nothing a remote
    process sends can stop the accept thread.

    Thread-safe. ``close()`` closes the listening socket and every connection still queued.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: bytes | str | None,
        shaper: Shaper | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        handshake_timeout_s: float = _handshake.DEFAULT_HANDSHAKE_TIMEOUT_S,
        hello: dict[str, Any] | None = None,
        max_pending: int = 1024,
        max_handshakes: int = 64,
        max_handshakes_per_source: int = 8,
        encryption: bool = True,
    ) -> None:
        if handshake_timeout_s <= 0:
            raise ValueError(f"handshake_timeout_s must be > 0, got {handshake_timeout_s}")
        self._token = _handshake.normalize_token(token)
        self._encryption = bool(encryption)
        self._shaper = shaper
        self._max_frame_bytes = max_frame_bytes
        self._handshake_timeout_s = handshake_timeout_s
        self._hello = dict(hello or {})
        self._max_pending = max_pending
        self._slots = HandshakeSlots(
            name="listener",
            max_total=max_handshakes,
            max_per_source=max_handshakes_per_source,
        )
        self._cond = threading.Condition()
        self._pending: dict[tuple[str, str], list[tuple[Connection, dict[str, Any]]]] = {}
        self._handlers: dict[str, Handler] = {}
        self._closed = False
        self._sock = socket.create_server((host, port), backlog=128)
        # Accept polls so that close() is noticed without relying on shutdown() of a listening
        # socket (which does not wake accept() on every platform).
        self._sock.settimeout(0.2)
        bound = self._sock.getsockname()
        self.address: tuple[str, int] = (host, int(bound[1]))
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"lowcomm-listener-{self.address[1]}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"PeerListener(address={self.address!r})"

    @property
    def num_rejected(self) -> int:
        """Connections refused before authentication (caps, failed or timed-out handshakes)."""
        return self._slots.num_rejected

    @property
    def num_evicted(self) -> int:
        """Handshakes cut short to make room for a priority source."""
        return self._slots.num_evicted

    @contextlib.contextmanager
    def expecting(self, hosts: Iterable[str]) -> Iterator[None]:
        """While the block runs, connections from ``hosts`` are served before strangers (the
        ring's set-up names its left neighbour's host)."""
        with self._slots.expecting(hosts):
            yield

    def set_handler(self, purpose: str, handler: Handler | None) -> None:
        """Routes future connections of ``purpose`` to ``handler(conn, hello)`` (called on the
        handshake thread; it owns the connection) instead of the ``wait_for`` queue. ``None``
        removes it."""
        with self._cond:
            if handler is None:
                self._handlers.pop(purpose, None)
            else:
                self._handlers[purpose] = handler

    def wait_for(
        self, purpose: str, key: str, *, count: int, timeout_s: float
    ) -> list[tuple[Connection, dict[str, Any]]]:
        """Blocks until ``count`` connections with this purpose and key have arrived, removes them
        from the queue and returns them (with their hellos) in arrival order.

        Raises:
            CommTimeoutError: fewer arrived within ``timeout_s`` (those stay queued).
            CommError: the listener is closed.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise CommError(f"listener {self.address} is closed")
                got = self._pending.get((purpose, key), [])
                if len(got) >= count:
                    taken, rest = got[:count], got[count:]
                    self._pending[(purpose, key)] = rest
                    return taken
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeoutError(
                        f"waited {timeout_s:.3g} s for {count} {purpose!r} connections with key "
                        f"{key!r} on {self.address}, {len(got)} arrived: a peer is missing, "
                        "stalled, or uses another ring id"
                    )
                self._cond.wait(left)

    def close(self) -> None:
        """Stops accepting and closes every queued connection. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = [c for items in self._pending.values() for c, _ in items]
            self._pending.clear()
            self._cond.notify_all()
        for conn in pending:
            conn.close()
        self._thread.join(timeout=2.0)
        self._sock.close()

    def _accept_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
            try:
                client, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed:
                    return
                logger.warning("listener %s: accept failed: %s", self.address, exc)
                time.sleep(0.05)
                continue
            host = str(addr[0])
            slot = self._slots.admit(client, host)
            if slot is None:
                with contextlib.suppress(OSError):
                    client.close()
                continue
            try:
                threading.Thread(
                    target=self._serve, args=(client, slot), name="lowcomm-handshake", daemon=True
                ).start()
            except RuntimeError:  # cannot start a thread (resource limit): refuse this one
                self._slots.release(slot)
                client.close()

    def _serve(self, client: socket.socket, slot: Slot) -> None:
        try:
            try:
                conn, hello = _handshake.accept(
                    client,
                    token=self._token,
                    hello=self._hello,
                    timeout_s=self._handshake_timeout_s,
                    max_frame_bytes=self._max_frame_bytes,
                    shaper=self._shaper,
                    encryption=self._encryption,
                )
            except (CommError, OSError) as exc:
                if not slot.evicted:
                    self._slots.rejected(slot.host, str(exc))
                return
            self._slots.release(slot)
            self._slots.authenticated(slot.host)
            purpose, key = hello.get("purpose"), hello.get("key")
            if not isinstance(purpose, str) or not isinstance(key, str):
                logger.info(
                    "listener %s: %s sent a hello without purpose/key", self.address, conn.peer
                )
                conn.close()
                return
            with self._cond:
                handler = self._handlers.get(purpose)
                if handler is None:
                    if self._closed or sum(map(len, self._pending.values())) >= self._max_pending:
                        logger.warning(
                            "listener %s: dropping %s (closed or queue full)",
                            self.address,
                            conn.peer,
                        )
                        conn.close()
                        return
                    self._pending.setdefault((purpose, key), []).append((conn, hello))
                    self._cond.notify_all()
                    return
            try:
                handler(conn, hello)
            except Exception:
                logger.exception("listener %s: handler for %r failed", self.address, purpose)
                conn.close()
        except Exception:  # never let a bug in routing kill anything but this connection
            logger.exception("listener %s: unexpected error serving a connection", self.address)
            with contextlib.suppress(OSError):
                client.close()
        finally:
            self._slots.release(slot)
