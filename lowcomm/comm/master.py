"""The master's TCP server: it accepts authenticated connections and dispatches requests.

The master coordinates a run's membership, admission, lockstep phases and revisions; it holds no
tensors. Peers talk to it over authenticated ``_frames`` connections (two per peer: a *session*
connection that registers and heartbeats, and *control* connections for requests). Each request
is parsed into its typed form (``_protocol.parse_request``) and handed to the membership state
machine (``_membership.Membership``), which the module docstring there describes: membership,
gates, commit votes, restart.

Thread model: one thread per connection, one janitor thread for heartbeat timeouts; all
membership state is guarded by one lock. Requests never block the master for long: a waiting
request holds its handler thread for at most ``wait_s`` (capped) and the peer polls again. A
connection whose content the master cannot parse is closed and counted in
``snapshot()["num_rejected_connections"]``.

Before authentication a connection is admitted by ``_handshake_slots.HandshakeSlots`` (a short handshake
deadline, caps per source host and in total, hosts that authenticated before served ahead of
strangers); after it, at most ``max_connections`` authenticated connections are kept.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

from lowcomm.comm import _frames, _handshake
from lowcomm.comm._handshake_slots import HandshakeSlots, Slot
from lowcomm.comm._membership import Membership
from lowcomm.comm._protocol import (
    KIND_REQUEST,
    KIND_RESPONSE,
    MAX_CONTROL_FRAME_BYTES,
    ErrorCode,
    Op,
    RegisterRequest,
    Request,
    VoteRequest,
    parse_address,
    parse_request,
    parse_secret,
)
from lowcomm.comm.errors import CommError, PeerFailureError, ProtocolError
from lowcomm.faults import FaultInjector

__all__ = ["Master", "parse_address"]

logger = logging.getLogger(__name__)

# How long a connection may sit idle before the master drops it (a peer's session connection
# heartbeats far more often; a control connection may idle through a long training phase).
_IDLE_TIMEOUT_S = 7 * 24 * 3600.0
_SEND_TIMEOUT_S = 10.0


class Master:
    """Membership, admission, phase gates and commit votes of one run. Holds no tensors.

    Args:
        listen: ``(host, port)`` or ``"host:port"`` to listen on; port 0 picks a free one.
        token: the run token; every connection must prove it knows it (at least 128 bits, see
            ``_handshake.check_token``; ``lowcomm token new`` makes one). None: no auth.
        config_blob: the run's configuration, handed to every peer at registration.
        heartbeat_timeout_s: a peer silent for this long is evicted.
        first_peer_grace_s: the first peer of an empty world is accepted unasked only this long
            after ``start()``: a restarted master's peers re-register within it (they retry every
            0.2 s), so a joiner arriving just after a restart waits to be admitted by them
            instead of founding a world of its own.
        faults: optional fault injector, hit at ``master.request`` before each answer (context:
            ``op``, ``peer``) and at ``master.commit`` on each commit-protocol message (each
            peer's vote received, each verdict about to be sent: context ``message``, ``index``,
            ``op``, ``peer``). None in production.
        encryption: seal every frame after the handshake (default); False only on a trusted
            network, and then on every peer too (``CommConfig(encryption=False)``).
        handshake_timeout_s: how long an unauthenticated connection may take to prove the token.
        max_handshakes, max_handshakes_per_source: concurrent unauthenticated handshakes, in
            total and from one host.
        max_connections: authenticated connections kept at once (a peer holds about three).

    ``start()`` binds and serves on background threads; ``stop()`` closes everything. Both are
    idempotent and thread-safe. The master survives malformed, oversized or unauthenticated
    connections: each is closed with a logged reason.
    """

    def __init__(
        self,
        listen: tuple[str, int] | str = ("127.0.0.1", 0),
        *,
        token: bytes | str | None = None,
        config_blob: bytes = b"",
        heartbeat_timeout_s: float = 10.0,
        first_peer_grace_s: float = 1.0,
        faults: FaultInjector | None = None,
        encryption: bool = True,
        handshake_timeout_s: float = _handshake.DEFAULT_HANDSHAKE_TIMEOUT_S,
        max_handshakes: int = 64,
        max_handshakes_per_source: int = 8,
        max_connections: int = 4096,
    ) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        if handshake_timeout_s <= 0:
            raise ValueError(f"handshake_timeout_s must be > 0, got {handshake_timeout_s}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not 0 <= first_peer_grace_s <= 60:
            raise ValueError(f"first_peer_grace_s must be in [0, 60], got {first_peer_grace_s}")
        self._listen = parse_address(listen)
        self._token = _handshake.normalize_token(token)
        self.encryption = bool(encryption)
        self._handshake_timeout_s = float(handshake_timeout_s)
        self._max_connections = int(max_connections)
        self._slots = HandshakeSlots(
            name="master", max_total=max_handshakes, max_per_source=max_handshakes_per_source
        )
        self._config_blob = bytes(config_blob)
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        # A fresh epoch per master process: ring ids include it, so rings are rebuilt after a
        # restart and never mix sockets of two masters' worlds.
        self.epoch = secrets.token_hex(4)
        self._faults = faults
        self._membership = Membership(
            epoch=self.epoch,
            config_blob=self._config_blob,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
            first_peer_grace_s=float(first_peer_grace_s),
        )
        self._handlers: dict[Op, Callable[[Any], dict[str, Any]]] = {
            Op.REGISTER: self._membership.register,
            Op.HEARTBEAT: self._membership.heartbeat,
            Op.STATUS: self._membership.status,
            Op.GATE: self._membership.gate,
            Op.LEAVE_GATE: self._membership.leave_gate,
            Op.VOTE: self._membership.vote,
            Op.VERDICT: self._membership.verdict,
            Op.SYNC_DONE: self._membership.sync_done,
            Op.LEAVE: self._membership.leave,
        }
        self._lock = threading.Lock()  # guards _conns and _num_rejected
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[_frames.Connection] = set()
        self._stopped = threading.Event()
        # Failed handshakes and connections closed for content the master could not parse.
        self._num_rejected = 0
        # (message, op id) -> peers already counted at the master.commit fault point.
        self._commit_seen: dict[tuple[str, str], set[str]] = {}
        self._verdict_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound; valid after ``start()``."""
        if self._sock is None:
            raise RuntimeError("Master.address is known only after start()")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> Master:
        """Binds the listening socket and starts serving in background threads. Returns self."""
        if self._sock is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A restarted master must rebind the same port while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self._listen)
        sock.listen(128)
        sock.settimeout(0.2)
        self._sock = sock
        for target, name in ((self._accept_loop, "accept"), (self._janitor, "janitor")):
            t = threading.Thread(target=target, name=f"lowcomm-master-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("master listening on %s:%d (epoch %s)", *self.address, self.epoch)
        return self

    def stop(self) -> None:
        """Closes the listening socket and every connection; joins the background threads."""
        self._stopped.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        with self._lock:
            conns = list(self._conns)
        self._membership.wake()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> Master:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of the run, for logs, monitoring and tests. Thread-safe.

        Keys: ``epoch``, ``revision``, ``accepted`` and ``pending`` (peer ids), ``evicted`` (peer
        id -> reason), ``waiting`` (peer id -> the phase it waits in), and
        ``num_rejected_connections``: connections refused at the handshake (wrong token, not
        lowcomm) or closed for content the master could not parse, since ``start()``.
        """
        with self._lock:
            rejected = self._num_rejected + self._slots.num_rejected
        return {**self._membership.snapshot(), "num_rejected_connections": rejected}

    def evict(self, peer_id: str, reason: str = "evicted by the operator") -> None:
        """Removes ``peer_id`` from the run now, as if it had died: its pending operations abort
        and its next call raises ``TopologyError``. Thread-safe; an unknown peer is ignored."""
        self._membership.evict(peer_id, reason)

    def _reject(self) -> None:
        with self._lock:
            self._num_rejected += 1

    # ------------------------------------------------------------------ networking
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopped.is_set():
            try:
                client, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            slot = self._slots.admit(client, str(addr[0]))
            if slot is not None:
                with self._lock:
                    full = len(self._conns) >= self._max_connections
                if full:
                    self._slots.release(slot)
                    self._slots.rejected(slot.host, "the master's connection cap is reached")
                    slot = None
            if slot is None:
                with contextlib.suppress(OSError):
                    client.close()
                continue
            try:
                threading.Thread(
                    target=self._serve_connection,
                    args=(client, addr, slot),
                    name=f"lowcomm-master-conn-{addr[1]}",
                    daemon=True,
                ).start()
            except RuntimeError:  # cannot start a thread (resource limit): refuse this one
                self._slots.release(slot)
                client.close()

    def _serve_connection(self, client: socket.socket, addr: Any, slot: Slot) -> None:
        try:
            conn, _hello = _handshake.accept(
                client,
                token=self._token,
                hello={"role": "master", "epoch": self.epoch},
                timeout_s=self._handshake_timeout_s,
                max_frame_bytes=MAX_CONTROL_FRAME_BYTES,
                encryption=self.encryption,
            )
        except (CommError, OSError, ValueError) as e:
            if not slot.evicted:
                self._slots.rejected(slot.host, str(e))
            with contextlib.suppress(OSError):
                client.close()
            return
        finally:
            self._slots.release(slot)
        self._slots.authenticated(slot.host)
        with self._lock:
            if self._stopped.is_set():
                conn.close()
                return
            self._conns.add(conn)
        session_peer: str | None = None  # set when this connection registered (its session)
        bound: list[str] = []  # the one peer this connection speaks for, once it proved it
        try:
            while not self._stopped.is_set():
                kind, _tag, request = conn.recv_json(timeout_s=_IDLE_TIMEOUT_S)
                if kind != KIND_REQUEST or not isinstance(request, dict):
                    raise _BadRequest(f"expected a request object, got kind {kind}")
                req = self._parse(request)
                response = self._dispatch(req, self._parse_secret(request), bound)
                # Only the connection that registered is the peer's session (closing it evicts).
                if req.OP == Op.REGISTER and "error" not in response:
                    session_peer = str(response.get("peer_id", req.peer_id))
                if self._faults is not None:
                    self._faults.hit("master.request", op=str(req.OP), peer=req.peer_id)
                if isinstance(req, VoteRequest) and response.get("verdict") and self._faults:
                    # Under test, verdicts leave one at a time, so a fault at verdict ``index``
                    # dies with exactly ``index`` of them sent.
                    with self._verdict_lock:
                        self._commit_point("verdict", req.op_id, req.peer_id)
                        conn.send_json(KIND_RESPONSE, response, timeout_s=_SEND_TIMEOUT_S)
                else:
                    conn.send_json(KIND_RESPONSE, response, timeout_s=_SEND_TIMEOUT_S)
        except _BadRequest as e:
            self._reject()
            logger.warning("master: closing connection from %s: bad request: %s", addr, e)
        except (RecursionError, MemoryError) as e:  # JSON the decoder could not hold
            self._reject()
            logger.warning("master: closing connection from %s: unparseable request: %r", addr, e)
        except (CommError, OSError, ValueError) as e:
            # An authenticated connection that ends is normal (a peer died or left); only
            # content the master could not parse counts as rejected.
            if not self._stopped.is_set():
                # A ValueError here is JSON the decoder refused (an int of 5,000 digits).
                bad = isinstance(e, ProtocolError | ValueError)
                if bad and not isinstance(e, PeerFailureError):
                    self._reject()
                    logger.warning("master: closing connection from %s: %s", addr, e)
                else:
                    logger.info("master: connection from %s closed: %s", addr, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            if session_peer is not None and not self._stopped.is_set():
                self._membership.evict(
                    session_peer, "its session connection closed (process died?)"
                )

    # ------------------------------------------------------------------ request dispatch
    @staticmethod
    def _parse(obj: dict[str, Any]) -> Request:
        try:
            return parse_request(obj)
        except ProtocolError as e:
            raise _BadRequest(str(e)) from e

    @staticmethod
    def _parse_secret(obj: dict[str, Any]) -> str:
        try:
            return parse_secret(obj)
        except ProtocolError as e:
            raise _BadRequest(str(e)) from e

    def _dispatch(self, req: Request, secret: str, bound: list[str]) -> dict[str, Any]:
        """Checks that the request speaks for the peer this connection is bound to (binding it at
        its first request) and with that peer's secret, then runs it."""
        if bound and req.peer_id != bound[0]:
            self._reject()
            return {
                "error": ErrorCode.FORBIDDEN,
                "message": f"this connection speaks for peer {bound[0]}, not {req.peer_id}",
            }
        if isinstance(req, RegisterRequest):
            register = req
            response = self._handle(lambda: self._membership.register(register, secret), req)
        else:
            refused = self._membership.authorize(req.peer_id, secret)
            if refused is not None:
                self._reject()
                return refused
            if isinstance(req, VoteRequest):
                self._commit_point("vote", req.op_id, req.peer_id)
            response = self._handle(lambda: self._handlers[req.OP](req), req)
        if not bound and "error" not in response:
            bound.append(str(response.get("peer_id") or req.peer_id))
        return response

    def _commit_point(self, message: str, op_id: str, peer_id: str) -> None:
        """The ``master.commit`` fault point, at each peer's first vote received and first
        verdict about to be sent per operation (``index``: how many came before it)."""
        if self._faults is None:
            return
        with self._lock:
            seen = self._commit_seen.setdefault((message, op_id), set())
            if peer_id in seen:
                return
            seen.add(peer_id)
            index = len(seen) - 1
            while len(self._commit_seen) > 4096:
                del self._commit_seen[next(iter(self._commit_seen))]
        self._faults.hit("master.commit", message=message, index=index, op=op_id, peer=peer_id)

    @staticmethod
    def _handle(run: Callable[[], dict[str, Any]], req: Request) -> dict[str, Any]:
        try:
            return run()
        except Exception as e:  # hostile input must never kill the thread with a traceback
            raise _BadRequest(f"malformed {str(req.OP)!r} request: {e!r}"[:300]) from e

    def _janitor(self) -> None:
        period = min(0.1, self.heartbeat_timeout_s / 10)
        while not self._stopped.wait(period):
            self._membership.expire()


class _BadRequest(Exception):
    """A syntactically valid frame with content the master does not understand."""
