"""The master: membership, admission, lockstep phases and revisions of a run; it holds no tensors.

Peers talk to the master over authenticated ``_frames`` connections (two per peer: a *session*
connection that registers and heartbeats, and a *control* connection for requests). The master
is a small state machine:

- **Membership.** ``register`` makes a peer *pending* (the very first peer of an empty run is
  accepted at once). Pending peers become *accepted* only when every accepted peer has reached
  the ``update_topology`` gate, so a joiner never blocks running peers beyond one
  ``update_topology()``. A peer whose session connection closes, or that sends no heartbeat for
  ``heartbeat_timeout_s`` (SIGSTOP, a dead host), is evicted.
- **Gates (phases).** ``update_topology``, ``are_peers_pending``, each ``all_reduce`` (by tag) and
  each shared-state sync is a gate: it opens once every accepted peer of its scope (the world, or
  one peer group) has arrived with the same phase. The master knows the phase each waiting peer
  is in, so two peers waiting at *different* gates that each need the other (one in
  ``update_topology``, another in ``all_reduce``) is detected at once and both get a
  ``TopologyError`` instead of a hang.
- **Commit votes.** After a ring all-reduce every participant votes ok/fail; the result is
  applied only if all voted ok (any fail, death or defection aborts it on everyone), so nobody
  applies a partial result.
- **Restart.** A new master on the same address knows nothing; peers re-register as accepted and
  tell it the world they knew. Peers of that world that do not come back within the heartbeat
  timeout are evicted, so gates never open on a partial world by accident.

Thread model: one thread per connection, one janitor thread for heartbeat timeouts; all state is
guarded by one lock (``_cond``). Requests never block the master for long: a waiting request
holds its handler thread for at most ``wait_s`` (capped) and the peer polls again.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowcomm.comm import _frames, _handshake
from lowcomm.comm.errors import CommError, PeerFailureError, ProtocolError

__all__ = ["Master", "parse_address"]

logger = logging.getLogger(__name__)

# Frame kinds of the control protocol (requests and responses are JSON objects).
KIND_REQUEST = 0x40
KIND_RESPONSE = 0x41

# The longest a request may hold the master's handler thread before answering "waiting".
_MAX_WAIT_S = 1.0
# Control messages are small; anything larger is garbage and closes the connection.
MAX_CONTROL_FRAME_BYTES = 16 * 1024 * 1024
# How long a connection may sit idle before the master drops it (a peer's session connection
# heartbeats far more often; a control connection may idle through a long training phase).
_IDLE_TIMEOUT_S = 7 * 24 * 3600.0
_HANDSHAKE_TIMEOUT_S = 10.0
# A pending peer that has not polled for this long is not admitted (it stalled before admission).
_ADMIT_GRACE_S = 2.0
# Kept op records (commit votes, sync rounds); older ones are forgotten.
_MAX_OPS = 4096

_WORLD_SCOPED = ("topology", "pending")
_GROUP_SCOPED = ("all_reduce", "sync")


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` or ``(host, port)`` -> ``(host, port)``; ValueError naming the problem."""
    if isinstance(address, tuple):
        host, port = address
    else:
        host, sep, port_s = str(address).rpartition(":")
        if not sep or not host:
            raise ValueError(f"address must be HOST:PORT, got {address!r}")
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"address port must be an integer, got {address!r}") from None
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"address port must be in [0, 65535], got {port}")
    return str(host), int(port)


@dataclass
class _Arrival:
    """A peer waiting at a gate."""

    kind: str
    group: int
    key: str
    rid: str
    payload: dict[str, Any]

    def signature(self) -> tuple[str, int, str]:
        group = self.group if self.kind in _GROUP_SCOPED else -1
        return (self.kind, group, self.key)

    def describe(self) -> str:
        if self.kind == "all_reduce":
            return f"all_reduce(tag={self.key}, peer_group={self.group})"
        if self.kind == "sync":
            return f"sync_shared_state(peer_group={self.group})"
        if self.kind == "pending":
            return "are_peers_pending()"
        return "update_topology()"


@dataclass
class _Peer:
    peer_id: str
    peer_group: int
    address: tuple[str, int]
    accepted: bool
    join_seq: int
    last_seen: float
    ghost: bool = False  # known from a re-registering peer after a restart, not yet back
    # A pending peer is admitted only while it is visibly waiting in connect(): a joiner that
    # stalled or died before admission must not make the running peers wait for it.
    polling: int = 0
    last_poll: float = 0.0
    gate: _Arrival | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # rid -> response


@dataclass
class _Op:
    """A commit vote (all_reduce) or a sync round: participants, their votes, the verdict."""

    op_id: str
    kind: str  # "all_reduce" | "sync"
    group: int
    participants: list[str]
    votes: dict[str, bool] = field(default_factory=dict)
    verdict: str | None = None  # "commit" | "abort" for all_reduce; "done" for sync
    reason: str = ""


class Master:
    """Membership, admission, phase gates and commit votes of one run. Holds no tensors.

    Args:
        listen: ``(host, port)`` or ``"host:port"`` to listen on; port 0 picks a free one.
        token: the run token (bytes); every connection must prove it knows it. None: no auth.
        config_blob: the run's configuration, handed to every peer at registration.
        heartbeat_timeout_s: a peer silent for this long is evicted.

    ``start()`` binds and serves on background threads; ``stop()`` closes everything. Both are
    idempotent and thread-safe. The master survives malformed, oversized or unauthenticated
    connections: each is closed with a logged reason.
    """

    def __init__(
        self,
        listen: tuple[str, int] | str = ("127.0.0.1", 0),
        *,
        token: bytes | None = None,
        config_blob: bytes = b"",
        heartbeat_timeout_s: float = 10.0,
    ) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        if token is not None and not isinstance(token, bytes | bytearray):
            raise ValueError("token must be bytes or None")
        self._listen = parse_address(listen)
        self._token = bytes(token) if token is not None else None
        self._config_blob = bytes(config_blob)
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        # A fresh epoch per master process: ring ids include it, so rings are rebuilt after a
        # restart and never mix sockets of two masters' worlds.
        self.epoch = secrets.token_hex(4)
        self._cond = threading.Condition()
        self._peers: dict[str, _Peer] = {}
        self._evicted: dict[str, str] = {}  # peer_id -> reason
        self._ops: dict[str, _Op] = {}
        self._ring_gen: dict[int, int] = {}
        self._revision = 0
        self._join_seq = itertools.count()
        self._op_seq = itertools.count()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[_frames.Connection] = set()
        self._stopped = threading.Event()
        self.num_rejected_connections = 0  # failed handshakes and bad frames, for tests

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
        with self._cond:
            conns = list(self._conns)
            self._cond.notify_all()
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
        """A JSON-able view of membership, for logs and tests. Thread-safe."""
        with self._cond:
            return {
                "epoch": self.epoch,
                "revision": self._revision,
                "accepted": [p.peer_id for p in self._accepted()],
                "pending": [p.peer_id for p in self._peers.values() if not p.accepted],
                "evicted": dict(self._evicted),
                "waiting": {p.peer_id: p.gate.describe() for p in self._peers.values() if p.gate},
            }

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
            t = threading.Thread(
                target=self._serve_connection,
                args=(client, addr),
                name=f"lowcomm-master-conn-{addr[1]}",
                daemon=True,
            )
            t.start()

    def _serve_connection(self, client: socket.socket, addr: Any) -> None:
        try:
            conn, _hello = _handshake.accept(
                client,
                token=self._token,
                hello={"role": "master", "epoch": self.epoch},
                timeout_s=_HANDSHAKE_TIMEOUT_S,
                max_frame_bytes=MAX_CONTROL_FRAME_BYTES,
            )
        except (CommError, OSError, ValueError) as e:
            self.num_rejected_connections += 1
            logger.warning("master: refused connection from %s: %s", addr, e)
            with contextlib.suppress(OSError):
                client.close()
            return
        with self._cond:
            if self._stopped.is_set():
                conn.close()
                return
            self._conns.add(conn)
        session_peer: str | None = None  # set when this connection registered (its session)
        try:
            while not self._stopped.is_set():
                kind, _tag, request = conn.recv_json(timeout_s=_IDLE_TIMEOUT_S)
                if kind != KIND_REQUEST or not isinstance(request, dict):
                    raise _BadRequest(f"expected a request object, got kind {kind}")
                response = self._handle(request)
                if request.get("op") in ("register", "heartbeat") and "error" not in response:
                    session_peer = str(response.get("peer_id", request.get("peer_id")))
                conn.send_json(KIND_RESPONSE, response, timeout_s=_HANDSHAKE_TIMEOUT_S)
        except _BadRequest as e:
            self.num_rejected_connections += 1
            logger.warning("master: closing connection from %s: bad request: %s", addr, e)
        except (CommError, OSError, ValueError) as e:
            # An authenticated connection that ends is normal (a peer died or left); only
            # content the master could not parse counts as rejected.
            if not self._stopped.is_set():
                if isinstance(e, ProtocolError) and not isinstance(e, PeerFailureError):
                    self.num_rejected_connections += 1
                    logger.warning("master: closing connection from %s: %s", addr, e)
                else:
                    logger.info("master: connection from %s closed: %s", addr, e)
        finally:
            with self._cond:
                self._conns.discard(conn)
            conn.close()
            if session_peer is not None and not self._stopped.is_set():
                with self._cond:
                    self._evict(session_peer, "its session connection closed (process died?)")

    # ------------------------------------------------------------------ request dispatch
    def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        handler: Callable[[dict[str, Any]], dict[str, Any]] | None = {
            "register": self._op_register,
            "heartbeat": self._op_heartbeat,
            "status": self._op_status,
            "gate": self._op_gate,
            "leave_gate": self._op_leave_gate,
            "vote": self._op_vote,
            "verdict": self._op_verdict,
            "sync_done": self._op_sync_done,
            "leave": self._op_leave,
        }.get(str(op))
        if handler is None:
            raise _BadRequest(f"unknown op {op!r}")
        try:
            return handler(req)
        except (KeyError, TypeError, ValueError) as e:
            raise _BadRequest(f"malformed {op!r} request: {e!r}") from e

    def _known_peer(self, req: dict[str, Any]) -> _Peer | dict[str, Any]:
        peer_id = str(req["peer_id"])
        peer = self._peers.get(peer_id)
        if peer is not None:
            return peer
        if peer_id in self._evicted:
            return {
                "error": "evicted",
                "message": f"peer {peer_id} was evicted: {self._evicted[peer_id]}",
            }
        return {
            "error": "unknown_peer",
            "epoch": self.epoch,
            "message": f"master (epoch {self.epoch}) does not know peer {peer_id}",
        }

    def _op_register(self, req: dict[str, Any]) -> dict[str, Any]:
        group = int(req["peer_group"])
        host, port = req["address"]
        peer_id = str(req.get("peer_id") or secrets.token_hex(6))
        rejoin = bool(req.get("accepted", False))  # was accepted by an earlier master
        # A peer re-registering after a restart while still pending must stay pending even if
        # it is the first one back: only a fresh run's first peer is accepted unasked.
        returning = bool(req.get("rejoin", False))
        with self._cond:
            if peer_id in self._evicted:
                return {
                    "error": "evicted",
                    "message": f"peer {peer_id} was evicted: {self._evicted[peer_id]}",
                }
            now = time.monotonic()
            peer = self._peers.get(peer_id)
            if peer is not None and not peer.ghost:
                # A session reconnect of a live peer: keep its state.
                peer.last_seen = now
            elif peer is not None:
                peer.ghost = False
                peer.last_seen = now
                peer.address = (str(host), int(port))
            else:
                # After a restart, re-registering peers come back accepted; on a fresh run only
                # the first peer of an empty world is (nobody else could admit it).
                accepted = rejoin or (not returning and not self._accepted())
                self._peers[peer_id] = _Peer(
                    peer_id=peer_id,
                    peer_group=group,
                    address=(str(host), int(port)),
                    accepted=accepted,
                    join_seq=int(req.get("join_seq", -1)) if rejoin else next(self._join_seq),
                    last_seen=now,
                    last_poll=now,
                )
                if accepted:
                    self._bump(group)
                    if rejoin:
                        self._revision = max(self._revision, int(req.get("revision", 0)) + 1)
                logger.info(
                    "master: peer %s (group %d) registered %s",
                    peer_id,
                    group,
                    "accepted" if accepted else "pending",
                )
            if rejoin:
                # Peers it knew that are not back yet wait as ghosts until the heartbeat timeout.
                for entry in req.get("world", []):
                    pid = str(entry["peer_id"])
                    if pid in self._peers or pid in self._evicted:
                        continue
                    self._peers[pid] = _Peer(
                        peer_id=pid,
                        peer_group=int(entry["peer_group"]),
                        address=(str(entry["address"][0]), int(entry["address"][1])),
                        accepted=True,
                        join_seq=int(entry.get("join_seq", -1)),
                        last_seen=now,
                        ghost=True,
                    )
                    self._bump(int(entry["peer_group"]))
                # Keep join order stable across the restart; new joiners go after.
                top = max((p.join_seq for p in self._peers.values()), default=-1)
                self._join_seq = itertools.count(max(top + 1, next(self._join_seq)))
            self._evaluate()
            return {
                "peer_id": peer_id,
                "epoch": self.epoch,
                "heartbeat_timeout_s": self.heartbeat_timeout_s,
                "config_blob": base64.b64encode(self._config_blob).decode("ascii"),
                **self._status_of(self._peers[peer_id]),
            }

    def _op_heartbeat(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            peer = self._known_peer(req)
            if isinstance(peer, dict):
                return peer
            peer.last_seen = time.monotonic()
            return {"epoch": self.epoch, "accepted": peer.accepted, "revision": self._revision}

    def _op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        """Waits up to ``wait_s`` for this peer to be accepted; answers its status."""
        deadline = time.monotonic() + min(float(req.get("wait_s", 0.0)), _MAX_WAIT_S)
        with self._cond:
            peer = self._known_peer(req)
            if isinstance(peer, dict):
                return peer
            peer.polling += 1
            try:
                while not peer.accepted and time.monotonic() < deadline:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
                    if self._peers.get(peer.peer_id) is not peer:
                        gone = self._known_peer(req)  # evicted meanwhile
                        return gone if isinstance(gone, dict) else self._status_of(gone)
                return self._status_of(peer)
            finally:
                peer.polling -= 1
                peer.last_poll = time.monotonic()

    def _status_of(self, peer: _Peer) -> dict[str, Any]:
        return {"accepted": peer.accepted, "epoch": self.epoch, **self._world()}

    def _world(self) -> dict[str, Any]:
        return {
            "revision": self._revision,
            "world": [
                {
                    "peer_id": p.peer_id,
                    "peer_group": p.peer_group,
                    "address": list(p.address),
                    "join_seq": p.join_seq,
                }
                for p in self._accepted()
            ],
        }

    def _op_gate(self, req: dict[str, Any]) -> dict[str, Any]:
        kind = str(req["kind"])
        if kind not in _WORLD_SCOPED + _GROUP_SCOPED:
            raise ValueError(f"unknown gate kind {kind!r}")
        rid = str(req["rid"])
        deadline = time.monotonic() + min(float(req.get("wait_s", 0.0)), _MAX_WAIT_S)
        with self._cond:
            peer = self._known_peer(req)
            if isinstance(peer, dict):
                return peer
            if not peer.accepted:
                return {
                    "error": "not_accepted",
                    "message": f"peer {peer.peer_id} is not accepted yet: wait for connect()",
                }
            if rid not in peer.results and (peer.gate is None or peer.gate.rid != rid):
                if peer.gate is not None:
                    # A new phase replaces an abandoned one.
                    self._abandon(peer)
                self._abandon_votes(peer.peer_id, "it moved on to another phase")
                peer.gate = _Arrival(
                    kind=kind,
                    group=peer.peer_group,
                    key=str(req.get("key", "")),
                    rid=rid,
                    payload=dict(req.get("payload") or {}),
                )
                self._evaluate()
            while True:
                if rid in peer.results:
                    return peer.results.pop(rid)
                if self._peers.get(peer.peer_id) is not peer:
                    return {"error": "evicted", "message": self._evicted.get(peer.peer_id, "")}
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return {"status": "waiting", "waiting_for": self._waiting_for(peer)}
                self._cond.wait(remaining)

    def _op_leave_gate(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            peer = self._known_peer(req)
            if isinstance(peer, dict):
                return peer
            if peer.gate is not None and peer.gate.rid == str(req["rid"]):
                self._abandon(peer)
            peer.results.pop(str(req["rid"]), None)
            self._abandon_votes(peer.peer_id, "it gave up (timeout)")
            self._evaluate()
            return {"ok": True}

    def _op_vote(self, req: dict[str, Any]) -> dict[str, Any]:
        """A participant's ok/fail vote on an all-reduce; answers the verdict once known."""
        op_id = str(req["op_id"])
        deadline = time.monotonic() + min(float(req.get("wait_s", 0.0)), _MAX_WAIT_S)
        with self._cond:
            op = self._ops.get(op_id)
            peer_id = str(req["peer_id"])
            if op is None or peer_id not in op.participants:
                return {
                    "verdict": "abort",
                    "reason": f"the master (epoch {self.epoch}) does not know operation {op_id} "
                    "(it restarted mid-operation)",
                }
            if peer_id not in op.votes:
                op.votes[peer_id] = bool(req["ok"])
                self._decide(op, failed_by=None if req["ok"] else peer_id)
            while op.verdict is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [p for p in op.participants if p not in op.votes]
                    return {"verdict": None, "waiting_for": missing}
                self._cond.wait(remaining)
            return {"verdict": op.verdict, "reason": op.reason}

    def _op_verdict(self, req: dict[str, Any]) -> dict[str, Any]:
        """Waits up to ``wait_s`` for an all-reduce's verdict without voting: participants whose
        ring is still running use it to abort early when another participant was evicted."""
        deadline = time.monotonic() + min(float(req.get("wait_s", 0.0)), _MAX_WAIT_S)
        with self._cond:
            op = self._ops.get(str(req["op_id"]))
            if op is None:
                return {"verdict": "abort", "reason": "unknown operation (master restarted)"}
            while op.verdict is None and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            return {"verdict": op.verdict, "reason": op.reason}

    def _op_sync_done(self, req: dict[str, Any]) -> dict[str, Any]:
        """A sync participant is finished (receivers: fetched and verified; sources: ready to
        stop serving). Answers once every live participant is finished."""
        op_id = str(req["op_id"])
        deadline = time.monotonic() + min(float(req.get("wait_s", 0.0)), _MAX_WAIT_S)
        with self._cond:
            op = self._ops.get(op_id)
            peer_id = str(req["peer_id"])
            if op is None or peer_id not in op.participants:
                return {"verdict": "abort", "reason": f"unknown sync round {op_id}"}
            op.votes.setdefault(peer_id, bool(req["ok"]))
            self._decide_sync(op)
            while op.verdict is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [p for p in op.participants if p not in op.votes]
                    return {"verdict": None, "waiting_for": missing}
                self._cond.wait(remaining)
            failed = [p for p, ok in op.votes.items() if not ok]
            return {"verdict": op.verdict, "failed": failed}

    def _op_leave(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            self._evict(str(req["peer_id"]), "it left (close())")
            return {"ok": True}

    # ------------------------------------------------------------------ state machine
    def _accepted(self, group: int | None = None) -> list[_Peer]:
        peers = [
            p
            for p in self._peers.values()
            if p.accepted and (group is None or p.peer_group == group)
        ]
        return sorted(peers, key=lambda p: (p.join_seq, p.peer_id))

    def _admissible(self, peer: _Peer) -> bool:
        """A pending peer that is waiting in connect() right now (or polled a moment ago)."""
        if peer.accepted or peer.ghost:
            return False
        return peer.polling > 0 or time.monotonic() - peer.last_poll < _ADMIT_GRACE_S

    def _bump(self, group: int) -> None:
        self._ring_gen[group] = self._ring_gen.get(group, 0) + 1

    def _scope(self, arrival: _Arrival) -> list[_Peer]:
        if arrival.kind in _WORLD_SCOPED:
            return self._accepted()
        return self._accepted(arrival.group)

    def _waiting_for(self, peer: _Peer) -> list[str]:
        if peer.gate is None:
            return []
        sig = peer.gate.signature()
        return [
            p.peer_id for p in self._scope(peer.gate) if p.gate is None or p.gate.signature() != sig
        ]

    def _abandon(self, peer: _Peer) -> None:
        peer.gate = None

    def _abandon_votes(self, peer_id: str, why: str) -> None:
        for op in self._ops.values():
            if op.verdict is None and peer_id in op.participants and peer_id not in op.votes:
                if op.kind == "all_reduce":
                    op.votes[peer_id] = False
                    self._decide(op, failed_by=peer_id, why=why)
                else:
                    op.votes[peer_id] = False
                    self._decide_sync(op)

    def _decide(
        self, op: _Op, *, failed_by: str | None, why: str = "it reported a failure"
    ) -> None:
        if op.verdict is not None:
            return
        if failed_by is not None:
            op.verdict = "abort"
            op.reason = f"peer {failed_by} failed this all-reduce: {why}"
            self._bump(op.group)  # every participant drops its ring and reconnects
        elif all(op.votes.get(p) for p in op.participants):
            op.verdict = "commit"
        self._cond.notify_all()

    def _decide_sync(self, op: _Op) -> None:
        if op.verdict is None and all(p in op.votes for p in op.participants):
            op.verdict = "done"
            self._cond.notify_all()

    def _evict(self, peer_id: str, reason: str) -> None:
        """Removes a peer (caller holds the lock); aborts its ops and re-evaluates gates."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        self._evicted[peer_id] = reason
        if peer.accepted:
            self._revision += 1
            self._bump(peer.peer_group)
        logger.warning("master: evicted peer %s: %s", peer_id, reason)
        for op in self._ops.values():
            if op.verdict is not None or peer_id not in op.participants:
                continue
            if op.kind == "all_reduce":
                if peer_id not in op.votes or not op.votes[peer_id]:
                    self._decide(op, failed_by=peer_id, why=reason)
                else:
                    # It voted ok before dying: the others may still commit.
                    self._decide(op, failed_by=None)
            else:
                op.participants.remove(peer_id)
                op.votes.pop(peer_id, None)
                self._decide_sync(op)
        self._evaluate()
        self._cond.notify_all()

    def _janitor(self) -> None:
        period = min(0.1, self.heartbeat_timeout_s / 10)
        while not self._stopped.wait(period):
            now = time.monotonic()
            with self._cond:
                for peer in list(self._peers.values()):
                    if now - peer.last_seen > self.heartbeat_timeout_s:
                        what = (
                            "never came back after a master restart"
                            if peer.ghost
                            else (
                                f"no heartbeat for {now - peer.last_seen:.1f} s "
                                f"(heartbeat_timeout_s={self.heartbeat_timeout_s})"
                            )
                        )
                        self._evict(peer.peer_id, what)

    def _evaluate(self) -> None:
        """Detects phases out of lockstep and opens complete gates (caller holds the lock)."""
        waiting = [p for p in self._peers.values() if p.gate is not None]
        # 1. Two peers waiting at different gates, each needing the other: a deadlock by
        #    construction. Fail both now rather than hang until a timeout.
        for p in waiting:
            for q in waiting:
                if p is q or p.gate is None or q.gate is None:
                    continue
                if p.gate.signature() == q.gate.signature():
                    continue
                if (
                    p in self._scope(p.gate)
                    and q in self._scope(p.gate)
                    and p in self._scope(q.gate)
                ):
                    msg = (
                        f"phases out of lockstep: peer {p.peer_id} is in {p.gate.describe()} "
                        f"while peer {q.peer_id} is in {q.gate.describe()}; every peer must call "
                        "the same phases in the same order"
                    )
                    logger.warning("master: %s", msg)
                    for x in (p, q):
                        assert x.gate is not None
                        x.results[x.gate.rid] = {"error": "lockstep", "message": msg}
                        x.gate = None
        # 2. Open every gate whose whole scope has arrived.
        seen: set[tuple[str, int, str]] = set()
        for p in list(self._peers.values()):
            if p.gate is None or p.gate.signature() in seen:
                continue
            sig = p.gate.signature()
            seen.add(sig)
            scope = self._scope(p.gate)
            if scope and all(q.gate is not None and q.gate.signature() == sig for q in scope):
                self._open(sig[0], p.gate.group, scope)
        self._cond.notify_all()

    def _open(self, kind: str, group: int, scope: list[_Peer]) -> None:
        arrivals = {p.peer_id: p.gate for p in scope}
        for p in scope:
            p.gate = None
        results: dict[str, dict[str, Any]]
        if kind == "topology":
            admitted = [p for p in self._peers.values() if self._admissible(p)]
            for p in admitted:
                p.accepted = True
                p.join_seq = next(self._join_seq)
                self._bump(p.peer_group)
            if admitted:
                self._revision += 1
                logger.info(
                    "master: admitted %s at revision %d",
                    ", ".join(p.peer_id for p in admitted),
                    self._revision,
                )
            results = {p.peer_id: {"status": "open", **self._world()} for p in scope}
        elif kind == "pending":
            pending = any(self._admissible(p) for p in self._peers.values())
            results = {
                p.peer_id: {"status": "open", "pending": pending, **self._world()} for p in scope
            }
        elif kind == "all_reduce":
            results = self._open_all_reduce(group, scope, arrivals)
        else:
            results = self._open_sync(group, scope, arrivals)
        for p in scope:
            arrival = arrivals[p.peer_id]
            assert arrival is not None
            p.results[arrival.rid] = results[p.peer_id]

    def _new_op(self, kind: str, group: int, participants: list[str]) -> _Op:
        op = _Op(
            op_id=f"{self.epoch}-{next(self._op_seq)}",
            kind=kind,
            group=group,
            participants=participants,
        )
        self._ops[op.op_id] = op
        if len(self._ops) > _MAX_OPS:
            for old in list(self._ops)[: len(self._ops) - _MAX_OPS]:
                if self._ops[old].verdict is not None:
                    del self._ops[old]
        return op

    def _open_all_reduce(
        self, group: int, scope: list[_Peer], arrivals: dict[str, _Arrival | None]
    ) -> dict[str, dict[str, Any]]:
        # Every participant must describe the same operation, else the ring would mix
        # unrelated buffers: refuse it on all of them.
        described = {pid: a.payload for pid, a in arrivals.items() if a is not None}
        first = next(iter(described.values()))
        for pid, payload in described.items():
            if payload != first:
                msg = (
                    f"peers disagree on the all_reduce arguments: {scope[0].peer_id} has "
                    f"{first}, {pid} has {payload}"
                )
                return {p.peer_id: {"error": "mismatch", "message": msg} for p in scope}
        op = self._new_op("all_reduce", group, [p.peer_id for p in scope])
        ring_id = f"{self.epoch}.g{group}.r{self._ring_gen.get(group, 0)}"
        addresses = [list(p.address) for p in scope]
        return {
            p.peer_id: {
                "status": "open",
                "op_id": op.op_id,
                "ring_id": ring_id,
                "rank": i,
                "participants": op.participants,
                "addresses": addresses,
                **self._world(),
            }
            for i, p in enumerate(scope)
        }

    def _open_sync(
        self, group: int, scope: list[_Peer], arrivals: dict[str, _Arrival | None]
    ) -> dict[str, dict[str, Any]]:
        payloads = {pid: a.payload for pid, a in arrivals.items() if a is not None}

        def state_key(payload: dict[str, Any]) -> tuple[int, str]:
            return int(payload["revision"]), str(payload["state_hash"])

        senders = [pid for pid, pl in payloads.items() if pl["strategy"] == "send_only"]
        voters = senders or [
            pid for pid, pl in payloads.items() if pl["strategy"] == "enforce_popular"
        ]
        if not voters:
            msg = "no peer can provide the shared state: every peer of the group is receive_only"
            return {pid: {"error": "sync", "message": msg} for pid in payloads}
        counts: dict[tuple[int, str], int] = {}
        for pid in voters:
            counts[state_key(payloads[pid])] = counts.get(state_key(payloads[pid]), 0) + 1
        if senders and len(counts) > 1:
            msg = f"send_only peers disagree on the shared state: {sorted(counts)}"
            return {pid: {"error": "sync", "message": msg} for pid in payloads}
        # Most popular; ties go to the higher revision, then the hash (deterministic).
        winner = max(counts, key=lambda k: (counts[k], k[0], k[1]))
        sources = [pid for pid in voters if state_key(payloads[pid]) == winner]
        reference = payloads[sources[0]]
        op = self._new_op("sync", group, list(payloads))
        by_id = {p.peer_id: p for p in scope}
        results: dict[str, dict[str, Any]] = {}
        for pid, payload in payloads.items():
            if payload["strategy"] == "send_only" or state_key(payload) == winner:
                need: list[str] = []
            else:
                need = sorted(
                    name
                    for name, h in reference["hashes"].items()
                    if payload["hashes"].get(name) != h
                )
            results[pid] = {
                "status": "open",
                "op_id": op.op_id,
                "state_revision": winner[0],
                "state_hash": winner[1],
                "hashes": reference["hashes"],
                "meta": reference["meta"],
                "need": need,
                "sources": [
                    {"peer_id": s, "address": list(by_id[s].address)} for s in sources if s != pid
                ],
                "is_source": pid in sources,
                **self._world(),
            }
        return results


class _BadRequest(Exception):
    """A syntactically valid frame with content the master does not understand."""
