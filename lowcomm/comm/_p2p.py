"""Point-to-point tensor transfer between two accepted peers, over kept authenticated connections.

A message is a JSON header (dtype, shape), the tensor's bytes in frames of at most
``P2P_FRAME_BYTES``, and the receiver's JSON ack. Connections are kept between messages, by
(direction, peer, tag): a message then costs one round trip (the ack) instead of TCP and auth
handshakes as well. A per-key lock keeps messages of one key in order; a connection in use is out
of the cache. The sender opens a new connection only when it has no usable one, so on the
receiving side a new connection supersedes the kept one. No master round trip is involved: the
peers' addresses come from the ``ControlClient``'s view of the world.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from lowcomm._tensors import byte_view
from lowcomm.comm import _frames, _handshake
from lowcomm.comm._control import ControlClient
from lowcomm.comm._protocol import KIND_P2P_ACK, KIND_P2P_DATA, KIND_P2P_HEADER
from lowcomm.comm.errors import CommError, CommTimeoutError, PeerFailureError, ProtocolError
from lowcomm.comm.listener import PeerListener
from lowcomm.comm.shaper import Shaper
from lowcomm.faults import FaultInjector

__all__ = ["P2P_FRAME_BYTES", "P2P_KEEP_MAX", "P2P_MESSAGE_GRACE_S", "PointToPoint"]

logger = logging.getLogger(__name__)

# p2p payloads travel in frames of at most this size.
P2P_FRAME_BYTES = 1024 * 1024  # each frame that arrives extends a started message's grace
# Once a message has begun to arrive, recv reads the rest of it for at least this long even past
# its deadline: a caller that polls with short timeouts (the pipeline waits in slices, checking
# for an abort between them) must never cut a message in half, which loses it for both ends.
P2P_MESSAGE_GRACE_S = 10.0
# Kept point-to-point connections per communicator (both directions): past it the oldest is
# closed, so a caller that uses a new tag per message does not pile up sockets.
P2P_KEEP_MAX = 128

_Key = tuple[str, str, int]  # ("out" | "in", peer id, tag)


class PointToPoint:
    """One communicator's ``send``/``recv``: a small thread pool and the kept-connection cache.

    ``send``/``recv`` return futures; they run on the pool (so several may be in flight) and each
    ends by its ``deadline``. Thread-safe. ``close()`` stops the pool and closes kept connections.
    """

    def __init__(
        self,
        control: ControlClient,
        listener: PeerListener,
        *,
        shaper: Shaper | None,
        faults: FaultInjector | None,
    ) -> None:
        self._control = control
        self._listener = listener
        self._shaper = shaper
        self._faults = faults
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Kept connections, by key; exposed (read-only use) for tests that drop one on purpose.
        self.kept: dict[_Key, _frames.Connection] = {}
        self._locks: dict[_Key, threading.Lock] = {}
        # Sends of one key take their turn in the order they were submitted (``send``): the pool's
        # threads reach the key's lock in any order, and a lock is not first come, first served.
        self._turns: dict[_Key, list[int]] = {}  # key -> [next ticket, ticket whose turn it is]
        self._gave_up: dict[_Key, set[int]] = {}  # tickets that timed out waiting for their turn
        self._turn = threading.Condition(self._lock)

    def send(
        self, tensor: torch.Tensor, *, to: str, tag: int, deadline: float
    ) -> concurrent.futures.Future[None]:
        """Sends ``tensor`` (copied to contiguous CPU now) to ``to``; see ``Communicator.send``."""
        address = self._control.address_of(to)
        data = tensor.detach().to("cpu").contiguous()
        key: _Key = ("out", to, tag)
        pool = self._executor()
        with self._lock:
            turn = self._turns.setdefault(key, [0, 0])
            ticket, turn[0] = turn[0], turn[0] + 1
        return pool.submit(self._send_in_turn, key, ticket, data, to, address, tag, deadline)

    def _send_in_turn(
        self,
        key: _Key,
        ticket: int,
        data: torch.Tensor,
        to: str,
        address: tuple[str, int],
        tag: int,
        deadline: float,
    ) -> None:
        with self._turn:
            turn = self._turns[key]
            while turn[1] != ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._gave_up.setdefault(key, set()).add(ticket)
                    raise CommTimeoutError(f"send to peer {to} timed out behind earlier sends")
                self._turn.wait(left)
        try:
            self._send(data, to, address, tag, deadline)
        finally:
            with self._turn:
                turn[1] += 1
                gave_up = self._gave_up.get(key, set())
                while turn[1] in gave_up:
                    gave_up.discard(turn[1])
                    turn[1] += 1
                self._turn.notify_all()

    def recv(
        self, out: torch.Tensor, *, from_: str, tag: int, deadline: float
    ) -> concurrent.futures.Future[torch.Tensor]:
        """Receives into ``out`` from ``from_``; see ``Communicator.recv``."""
        self._control.address_of(from_)
        return self._executor().submit(self._recv, out, from_, tag, deadline)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            kept, self.kept = list(self.kept.values()), {}
        for conn in kept:
            conn.close()

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        self._control.check_usable()
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix=f"lowcomm-p2p-{self._control.peer_id}"
                )
            return self._pool

    @contextlib.contextmanager
    def _slot(self, key: _Key, deadline: float) -> Iterator[list[_frames.Connection | None]]:
        """Holds ``key``'s lock and lends its kept connection (``slot[0]``, None if there is none).

        The body leaves the connection it used in ``slot[0]`` to keep it for the next message,
        or None once it closed it; an exception closes whatever is in the slot.
        """
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise CommTimeoutError(f"{key[0]} p2p with {key[1]} (tag {key[2]}): still busy")
        try:
            with self._lock:
                slot: list[_frames.Connection | None] = [self.kept.pop(key, None)]
            try:
                yield slot
            except BaseException:
                if slot[0] is not None:
                    slot[0].close()
                raise
            conn = slot[0]
            evicted: list[_frames.Connection] = []
            if conn is not None:
                with self._lock:
                    if not self._control.closed.is_set():
                        self.kept[key] = conn
                        conn = None
                        while len(self.kept) > P2P_KEEP_MAX:
                            evicted.append(self.kept.pop(next(iter(self.kept))))
            for old in (conn, *evicted):
                if old is not None:
                    old.close()
        finally:
            lock.release()

    def _send(
        self, data: torch.Tensor, to: str, address: tuple[str, int], tag: int, deadline: float
    ) -> None:
        me = self._control.peer_id

        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise CommTimeoutError(f"send to peer {to} timed out")
            return t

        with self._slot(("out", to, tag), deadline) as slot:
            conn = slot[0]
            if conn is not None and _readable(conn, 0.0):
                # An idle connection has nothing to read: this is EOF (the receiver dropped it).
                conn.close()
                slot[0] = conn = None
            if conn is None:
                conn, _ = _handshake.connect(
                    address,
                    token=self._control.token,
                    encryption=self._control.encryption,
                    hello={"purpose": "p2p", "key": f"{me}>{to}#{tag}", "peer_id": me},
                    timeout_s=left(),
                    shaper=self._shaper,
                )
                slot[0] = conn
            header = {"dtype": str(data.dtype), "shape": list(data.shape)}
            conn.send_json(KIND_P2P_HEADER, header, tag=tag, timeout_s=left())
            if self._faults is not None and self._faults.hit("p2p.send", peer=to, tag=tag):
                data = data.clone()
                data.view(-1).view(torch.uint8)[:1] ^= 0xFF  # flip the first byte's bits
            raw = byte_view(data)
            for start in range(0, max(1, raw.nbytes), P2P_FRAME_BYTES):
                conn.send_frame(
                    KIND_P2P_DATA, raw[start : start + P2P_FRAME_BYTES], tag=tag, timeout_s=left()
                )
            kind, _tag, ack = conn.recv_json(timeout_s=left())
            if kind != KIND_P2P_ACK or not ack.get("ok"):
                raise PeerFailureError(f"peer {to} refused the tensor: {ack.get('message')}")

    def _recv(self, out: torch.Tensor, from_: str, tag: int, deadline: float) -> torch.Tensor:
        listener = self._listener
        key: _Key = ("in", from_, tag)
        hello_key = f"{from_}>{self._control.peer_id}#{tag}"

        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise CommTimeoutError(f"recv from peer {from_} timed out")
            return t

        def grace() -> float:  # for a message that has begun to arrive
            return max(deadline, time.monotonic() + P2P_MESSAGE_GRACE_S) - time.monotonic()

        def started() -> None:
            nonlocal deadline
            deadline = max(deadline, time.monotonic() + P2P_MESSAGE_GRACE_S)

        with self._slot(key, deadline) as slot:
            # The sender opens a new connection only when it has no usable one, so a new one
            # supersedes the kept one; the kept one is read only once it has bytes (or EOF).
            header: Any = None
            while header is None:
                kept = slot[0]
                if kept is None:
                    conns = listener.wait_for(
                        "p2p", hello_key, count=1, timeout_s=max(0.01, left())
                    )
                    slot[0] = conns[0][0]
                    kind, _tag, header = conns[0][0].recv_json(timeout_s=grace())
                    started()
                    break
                with contextlib.suppress(CommTimeoutError):
                    fresh = listener.wait_for("p2p", hello_key, count=1, timeout_s=0.0)[0][0]
                    kept.close()
                    slot[0] = fresh
                    continue
                try:
                    ready = _readable(kept, min(0.05, left()))
                except CommTimeoutError:
                    # Nothing of a message was read: the connection stays good for the next recv.
                    with self._lock:
                        if self._control.closed.is_set():
                            kept.close()
                        else:
                            self.kept.setdefault(key, kept)
                    slot[0] = None
                    raise
                if not ready:
                    continue
                try:
                    kind, _tag, header = kept.recv_json(timeout_s=grace())
                    started()
                except (CommError, OSError) as exc:  # EOF: the sender dropped it; wait for a new
                    logger.debug("kept p2p connection from %s ended: %s", from_, exc)
                    kept.close()
                    slot[0] = None
            conn = slot[0]
            assert conn is not None
            if kind != KIND_P2P_HEADER:
                raise ProtocolError(f"expected a p2p header from {from_}, got kind {kind}")
            if header.get("dtype") != str(out.dtype) or list(header.get("shape", [])) != list(
                out.shape
            ):
                msg = f"receiver expects {out.dtype}{list(out.shape)}, sender sent {header}"
                with contextlib.suppress(CommError):
                    conn.send_json(KIND_P2P_ACK, {"ok": False, "message": msg}, timeout_s=left())
                raise ValueError(f"recv(from_={from_}): {msg}")
            staging = torch.empty(out.numel(), dtype=out.dtype)
            raw = byte_view(staging)
            got = 0
            while got < raw.nbytes or (raw.nbytes == 0 and got == 0):
                # Each frame that arrives extends the grace: a long message on a slow link is
                # read to its end (giving up half-way would lose it for both ends).
                started()
                fh = conn.recv_header(timeout_s=left())
                if fh.kind != KIND_P2P_DATA or got + fh.length > raw.nbytes:
                    raise ProtocolError(f"unexpected p2p frame from {from_} (kind {fh.kind})")
                conn.recv_into(raw[got : got + fh.length], timeout_s=left())
                got += fh.length
                if raw.nbytes == 0:
                    break
            with torch.no_grad():
                out.copy_(staging.view(out.shape))
            conn.send_json(KIND_P2P_ACK, {"ok": True}, timeout_s=left())
            return out


def _readable(conn: _frames.Connection, timeout_s: float) -> bool:
    """Whether ``conn`` has bytes (or EOF) to read within ``timeout_s``."""
    try:
        ready, _, _ = select.select([conn.fileno()], [], [], timeout_s)
    except (OSError, ValueError):  # closed under us: reading will report it
        return True
    return bool(ready)
