"""The master's membership state machine: peers, admission, heartbeats, gates, votes, rounds.

- **Membership.** ``register`` makes a peer *pending* (the very first peer of an empty run is
  accepted at once). Pending peers become *accepted* only when every accepted peer has reached
  the ``update_topology`` gate, so a joiner never blocks running peers beyond one
  ``update_topology()``. A peer whose session connection closes, or that sends no heartbeat for
  ``heartbeat_timeout_s`` (SIGSTOP, a dead host), is evicted.
- **Replicas.** The ranks of a replica (a torchrun job) are admitted together or not at all, and
  evicted together: ``_admission`` holds the rules.
- **Gates (phases).** ``update_topology``, ``are_peers_pending``, each ``all_reduce`` (by tag) and
  each shared-state sync is a gate: it opens once every accepted peer of its scope (the world, or
  one peer group) has arrived with the same phase. The master knows the phase each waiting peer
  is in, so two peers waiting at *different* gates that each need the other (one in
  ``update_topology``, another in ``all_reduce``) is detected at once and both get a
  ``lockstep`` error (a ``TopologyError`` on the peers) instead of a hang.
- **Commit votes.** After a ring all-reduce every participant votes ok/fail; the result is
  applied only if all voted ok (any fail, death or defection aborts it on everyone), so nobody
  applies a partial result. A shared-state sync is a *round* that ends once every live
  participant reported done; which state it agrees on is ``_election``'s.
- **Restart.** A new master on the same address knows nothing; peers re-register as accepted and
  tell it the world they knew and where they stand in their latest all-reduce. Peers of that
  world that do not come back within the heartbeat timeout are evicted, so gates never open on a
  partial world by accident; an all-reduce the old master left undecided is resolved from the
  peers' reports (``_rounds``), all or nothing.
- **Identity.** A peer registers with a secret of its own; every later request must carry it,
  and a connection speaks for one peer only (``authorize``), so a token holder cannot act for
  another peer. After a restart the first registration of a peer id sets it again.

All state is guarded by one condition (``cond``); each operation method takes it. A waiting
operation holds its caller's thread for at most ``wait_s`` (capped at ``MAX_WAIT_S``).
"""

from __future__ import annotations

import base64
import itertools
import logging
import secrets
import time
from typing import Any

from lowcomm.comm._admission import (
    LEAVES_AS_A_WHOLE,
    admissible_units,
    copy_replica_fields,
    describe,
    is_complete,
    registration_conflict,
    stale_stamps,
)
from lowcomm.comm._election import ElectionError, elect, plans
from lowcomm.comm._peers import Arrival, PeerRecord
from lowcomm.comm._protocol import (
    ErrorCode,
    GateKind,
    GateRequest,
    HeartbeatRequest,
    LeaveGateRequest,
    LeaveRequest,
    RegisterRequest,
    StatusRequest,
    SyncDoneRequest,
    VerdictRequest,
    VoteRequest,
    forbidden,
    refuse_all_reduce,
)
from lowcomm.comm._roster import Roster
from lowcomm.comm._rounds import Round

__all__ = ["MAX_WAIT_S", "Membership"]

logger = logging.getLogger(__name__)

# The longest a request may hold the master's handler thread before answering "waiting".
MAX_WAIT_S = 1.0


class Membership(Roster):
    """The state machine of one run as the master sees it (see the module docstring), over its
    ``Roster``. Thread-safe; takes the same arguments as ``Roster``.
    """

    def register(self, req: RegisterRequest, secret: str = "") -> dict[str, Any]:
        """A session registers (or re-registers after a master restart, with the world it knew).
        ``secret``: the peer's own secret; every later request must carry it, and a live peer's
        session reconnecting must present the same one."""
        group = req.peer_group
        host, port = req.address
        peer_id = req.peer_id or secrets.token_hex(6)
        rejoin = req.accepted  # was accepted by an earlier master
        # A peer re-registering after a restart while still pending must stay pending even if
        # it is the first one back: only a fresh run's first peer is accepted unasked.
        returning = req.rejoin
        with self.cond:
            if peer_id in self._evicted:
                return {
                    "error": ErrorCode.EVICTED,
                    "message": f"peer {peer_id} was evicted: {self._evicted[peer_id]}",
                }
            refused, replaced = registration_conflict(req, self._replica_ranks(req.replica_id))
            if refused:
                return {"error": ErrorCode.MISMATCH, "message": refused}
            for old in replaced:  # a restarted replica: its old incarnation goes as a whole
                self._evict(old.peer_id, f"peer {req.peer_id} registered as its replica rank")
            now = time.monotonic()
            peer = self._peers.get(peer_id)
            if peer is not None and not peer.ghost:
                # A session reconnect of a live peer: keep its state, but only for the peer
                # itself (its secret), or any token holder could take over its identity.
                if not secrets.compare_digest(secret, peer.secret):
                    return forbidden(peer_id, "register")
                peer.last_seen = now
            elif peer is not None:
                peer.ghost = False
                peer.last_seen = now
                peer.address = (str(host), int(port))
                copy_replica_fields(peer, req)
            else:
                # After a restart, re-registering peers come back accepted; on a fresh run only
                # the first peer (or whole replica) of an empty world is (nobody else could admit
                # it), and only once a restarted master's peers had time to come back
                # (``_first_peer_due``).
                first = not returning and self._first_peer_due()
                accepted = rejoin or (first and not req.num_replica_ranks)
                self._peers[peer_id] = PeerRecord(
                    peer_id=peer_id,
                    peer_group=group,
                    address=(str(host), int(port)),
                    accepted=accepted,
                    join_seq=req.join_seq if rejoin else next(self._join_seq),
                    last_seen=now,
                    last_poll=now,
                    returning=returning,
                )
                copy_replica_fields(self._peers[peer_id], req)
                replica = self._replica_ranks(req.replica_id)
                if first and req.num_replica_ranks and is_complete(replica):
                    self._admit(replica)  # the first replica of an empty run, once complete
                if accepted:
                    self._bump(group)
                    if rejoin:
                        self._revision = max(self._revision, req.revision + 1)
                logger.info(
                    "master: peer %s (group %d) registered %s",
                    peer_id,
                    group,
                    "accepted" if accepted else "pending",
                )
            if rejoin:
                # Peers it knew that are not back yet wait as ghosts until the heartbeat timeout.
                for entry in req.world:
                    pid = entry.peer_id
                    if pid in self._peers or pid in self._evicted:
                        continue
                    self._peers[pid] = PeerRecord(
                        peer_id=pid,
                        peer_group=entry.peer_group,
                        address=entry.address,
                        accepted=True,
                        join_seq=entry.join_seq,
                        last_seen=now,
                        ghost=True,
                    )
                    copy_replica_fields(self._peers[pid], entry)
                    self._bump(entry.peer_group)
                # Keep join order stable across the restart; new joiners go after.
                top = max((p.join_seq for p in self._peers.values()), default=-1)
                self._join_seq = itertools.count(max(top + 1, next(self._join_seq)))
            record = self._peers[peer_id]
            record.last_op = req.last_op
            if not record.secret:
                # The peer's own secret (a peer of an older version sends none: issue one).
                record.secret = secret or secrets.token_hex(16)
            self._resolve_adopted()
            self._evaluate()
            return {
                "peer_id": peer_id,
                "secret": record.secret,
                "epoch": self.epoch,
                "heartbeat_timeout_s": self.heartbeat_timeout_s,
                "config_blob": base64.b64encode(self._config_blob).decode("ascii"),
                **self._status_of(self._peers[peer_id]),
            }

    def authorize(self, peer_id: str, secret: str) -> dict[str, Any] | None:
        """None if ``secret`` is the one issued to ``peer_id`` (or the master does not know the
        peer: the request then gets its usual unknown/evicted answer); else a ``forbidden``
        answer. The master calls it before every request but ``register``."""
        with self.cond:
            peer = self._peers.get(peer_id)
            if peer is None or peer.ghost or secrets.compare_digest(secret, peer.secret):
                return None
            return forbidden(peer_id, "act")

    def heartbeat(self, req: HeartbeatRequest) -> dict[str, Any]:
        """A session's heartbeat: the peer is alive."""
        with self.cond:
            peer = self._known_peer(req.peer_id)
            if isinstance(peer, dict):
                return peer
            peer.last_seen = time.monotonic()
            return {"epoch": self.epoch, "accepted": peer.accepted, "revision": self._revision}

    def status(self, req: StatusRequest) -> dict[str, Any]:
        """Waits up to ``wait_s`` for this peer to be accepted; answers its status."""
        deadline = time.monotonic() + min(req.wait_s, MAX_WAIT_S)
        with self.cond:
            peer = self._known_peer(req.peer_id)
            if isinstance(peer, dict):
                return peer
            peer.polling += 1
            try:
                while not peer.accepted and time.monotonic() < deadline:
                    if not peer.returning and self._first_peer_due():
                        if not peer.num_replica_ranks:
                            peer.accepted = True  # the first peer of a run that is still empty
                            peer.join_seq = next(self._join_seq)
                            self._bump(peer.peer_group)
                            break
                        replica = self._replica_ranks(peer.replica_id)
                        if is_complete(replica):
                            self._admit(replica)  # the first replica of an empty run, whole
                            break
                    self.cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
                    if self._peers.get(peer.peer_id) is not peer:
                        gone = self._known_peer(req.peer_id)  # evicted meanwhile
                        return gone if isinstance(gone, dict) else self._status_of(gone)
                return self._status_of(peer)
            finally:
                peer.polling -= 1
                peer.last_poll = time.monotonic()

    def gate(self, req: GateRequest) -> dict[str, Any]:
        """A peer arrives at (or polls again) a phase gate; answers once it opened, else after
        ``wait_s`` with ``"waiting"`` and whom it waits for."""
        kind = req.kind
        rid = req.rid
        deadline = time.monotonic() + min(req.wait_s, MAX_WAIT_S)
        with self.cond:
            peer = self._known_peer(req.peer_id)
            if isinstance(peer, dict):
                return peer
            if not peer.accepted:
                return {
                    "error": ErrorCode.NOT_ACCEPTED,
                    "message": f"peer {peer.peer_id} is not accepted yet: wait for connect()",
                }
            if rid not in peer.results and (peer.gate is None or peer.gate.rid != rid):
                if peer.lockstep is not None:
                    # Its scope failed out of lockstep before it arrived: this is that phase.
                    failure, peer.lockstep = peer.lockstep, None
                    return failure
                if peer.gate is not None:
                    # A new phase replaces an abandoned one.
                    self._abandon(peer)
                self._abandon_votes(peer.peer_id, "it moved on to another phase")
                peer.gate = Arrival(
                    kind=kind,
                    group=peer.peer_group,
                    key=req.key,
                    rid=rid,
                    payload=dict(req.payload),
                    nonfinite=req.nonfinite,
                )
                self._evaluate()
            while True:
                if rid in peer.results:
                    return peer.results.pop(rid)
                if self._peers.get(peer.peer_id) is not peer:
                    return {
                        "error": ErrorCode.EVICTED,
                        "message": self._evicted.get(peer.peer_id, ""),
                    }
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return {"status": "waiting", "waiting_for": self._waiting_for(peer)}
                self.cond.wait(remaining)

    def leave_gate(self, req: LeaveGateRequest) -> dict[str, Any]:
        """A peer gave up waiting at a gate (its call timed out)."""
        with self.cond:
            peer = self._known_peer(req.peer_id)
            if isinstance(peer, dict):
                return peer
            if peer.gate is not None and peer.gate.rid == req.rid:
                self._abandon(peer)
            peer.results.pop(req.rid, None)
            self._abandon_votes(peer.peer_id, "it gave up (timeout)")
            self._evaluate()
            return {"ok": True}

    def vote(self, req: VoteRequest) -> dict[str, Any]:
        """A participant's ok/fail vote on an all-reduce; answers the verdict once known."""
        op_id = req.op_id
        deadline = time.monotonic() + min(req.wait_s, MAX_WAIT_S)
        with self.cond:
            op = self._rounds.get(op_id)
            peer_id = req.peer_id
            known = self._known_peer(peer_id)
            if isinstance(known, dict) or known.ghost:
                # Unknown, or not back yet: its session re-registers (with its report) first.
                return known if isinstance(known, dict) else self._unknown(peer_id)
            if op is None and peer_id in req.participants:
                # An operation of an earlier master: resolve it from the peers' reports.
                op = self._rounds.adopt(op_id, req.group, req.participants)
                logger.info("master: adopted operation %s of an earlier master", op_id)
            if op is None or peer_id not in op.participants:
                return {
                    "verdict": "abort",
                    "reason": f"the master (epoch {self.epoch}) does not know operation {op_id} "
                    "(it restarted mid-operation)",
                }
            if peer_id not in op.votes:
                self._settle(op, op.vote(peer_id, req.ok))
                self._resolve_adopted()
            while op.verdict is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return {"verdict": None, "waiting_for": op.missing()}
                self.cond.wait(remaining)
            return {"verdict": op.verdict, "reason": op.reason}

    def verdict(self, req: VerdictRequest) -> dict[str, Any]:
        """Waits up to ``wait_s`` for an all-reduce's verdict without voting: participants whose
        ring is still running use it to abort early when another participant was evicted."""
        deadline = time.monotonic() + min(req.wait_s, MAX_WAIT_S)
        with self.cond:
            op = self._rounds.get(req.op_id)
            if op is None:
                return {"verdict": "abort", "reason": "unknown operation (master restarted)"}
            while op.verdict is None and time.monotonic() < deadline:
                self.cond.wait(max(0.0, deadline - time.monotonic()))
            return {"verdict": op.verdict, "reason": op.reason}

    def sync_done(self, req: SyncDoneRequest) -> dict[str, Any]:
        """A sync participant is finished (receivers: fetched and verified; sources: ready to
        stop serving). Answers once every live participant is finished."""
        op_id = req.op_id
        deadline = time.monotonic() + min(req.wait_s, MAX_WAIT_S)
        with self.cond:
            op = self._rounds.get(op_id)
            peer_id = req.peer_id
            if op is None or peer_id not in op.participants:
                return {"verdict": "abort", "reason": f"unknown sync round {op_id}"}
            op.report(peer_id, req.ok)
            self.cond.notify_all()
            while op.verdict is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return {"verdict": None, "waiting_for": op.missing()}
                self.cond.wait(remaining)
            failed = [p for p, ok in op.votes.items() if not ok]
            return {"verdict": op.verdict, "failed": failed}

    def leave(self, req: LeaveRequest) -> dict[str, Any]:
        """The peer closed its communicator: remove it now."""
        with self.cond:
            self._evict(req.peer_id, "it left (close())", clean=True)
            return {"ok": True}

    def evict(self, peer_id: str, reason: str) -> None:
        """Removes ``peer_id`` now (its session closed, or an operator's decision)."""
        with self.cond:
            self._evict(peer_id, reason)

    # ------------------------------------------------------------------ state machine

    def _scope(self, arrival: Arrival) -> list[PeerRecord]:
        if arrival.kind.world_scoped:
            return self._accepted()
        return self._accepted(arrival.group)

    def _waiting_for(self, peer: PeerRecord) -> list[str]:
        if peer.gate is None:
            return []
        sig = peer.gate.signature()
        return [
            p.peer_id for p in self._scope(peer.gate) if p.gate is None or p.gate.signature() != sig
        ]

    def _abandon(self, peer: PeerRecord) -> None:
        peer.gate = None

    def _abandon_votes(self, peer_id: str, why: str) -> None:
        for op in self._rounds.undecided():
            if op.verdict is None and peer_id in op.participants:
                self._settle(op, op.abandon(peer_id, why))

    def _settle(self, op: Round, aborted: bool) -> None:
        """After a round changed: an aborted commit vote makes every participant drop its ring
        and reconnect; waiters re-check their round."""
        if aborted:
            self._bump(op.group)
        self.cond.notify_all()

    def _evict(
        self, peer_id: str, reason: str, *, whole_replica: bool = True, clean: bool = False
    ) -> None:
        """Removes a peer (caller holds the lock); aborts its ops and re-evaluates gates. With
        ``whole_replica``, the other ranks of its replica go with it. ``clean``: the peer asked to
        leave, which is normal (logged at INFO, not as an eviction)."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        self._evicted[peer_id] = reason
        if peer.accepted:
            self._revision += 1
            self._bump(peer.peer_group)
        if clean:
            logger.info("master: peer %s left the run", peer_id)
        else:
            logger.warning("master: evicted peer %s: %s", peer_id, reason)
        for op in self._rounds.undecided():
            if op.verdict is None and peer_id in op.participants and not op.adopted:
                self._settle(op, op.lose(peer_id, reason))
        if peer.num_replica_ranks and whole_replica:
            # The replica leaves as a whole: a rank of a half replica would block in FSDP.
            why = f"its replica lost {describe(peer)} ({reason}); {LEAVES_AS_A_WHOLE}"
            for other in self._replica_ranks(peer.replica_id):
                self._evict(other.peer_id, why, whole_replica=False)
        self._resolve_adopted()
        self._evaluate()
        self.cond.notify_all()

    def _resolve_adopted(self) -> None:
        """Decides every undecided adopted round it can (caller holds the lock; ``_rounds``)."""
        for op in self._rounds.undecided():
            if op.adopted and op.verdict is None:
                states = {p: op.state_of(p, self._peers.get(p)) for p in op.participants}
                self._settle(op, op.resolve(states))
                if op.verdict is not None:
                    logger.info(
                        "master: adopted operation %s: %s (%s)", op.op_id, op.verdict, op.reason
                    )

    def expire(self) -> None:
        """Evicts every peer silent past the heartbeat timeout (the janitor calls it often)."""
        now = time.monotonic()
        with self.cond:
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
        #    construction. Fail the whole scope now, with one message, rather than hang.
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
                    self._fail_lockstep(p, q)
        # 2. Open every gate whose whole scope has arrived.
        seen: set[tuple[GateKind, int, str]] = set()
        for p in list(self._peers.values()):
            if p.gate is None or p.gate.signature() in seen:
                continue
            sig = p.gate.signature()
            seen.add(sig)
            scope = self._scope(p.gate)
            if scope and all(q.gate is not None and q.gate.signature() == sig for q in scope):
                self._open(sig[0], p.gate.group, scope)
        self.cond.notify_all()

    def _fail_lockstep(self, p: PeerRecord, q: PeerRecord) -> None:
        """Fails every peer of both scopes with the same ``lockstep`` error: those waiting now,
        and the others at their next arrival (they are due in one of these phases)."""
        assert p.gate is not None and q.gate is not None
        msg = (
            f"phases out of lockstep: peer {p.peer_id} is in {p.gate.describe()} while peer "
            f"{q.peer_id} is in {q.gate.describe()}; every peer must call the same phases (and "
            "all_reduce tags) in the same order"
        )
        logger.warning("master: %s", msg)
        failure = {"error": ErrorCode.LOCKSTEP, "message": msg}
        scope = {x.peer_id: x for x in (*self._scope(p.gate), *self._scope(q.gate))}
        for x in scope.values():
            if x.gate is not None:
                x.results[x.gate.rid] = dict(failure)
                x.gate = None
            else:
                x.lockstep = dict(failure)

    def _open(self, kind: GateKind, group: int, scope: list[PeerRecord]) -> None:
        arrivals = {p.peer_id: p.gate for p in scope}
        for p in scope:
            p.gate = None
        results: dict[str, dict[str, Any]]
        if kind == GateKind.TOPOLOGY:
            self._admit(admissible_units(list(self._peers.values()), self._admissible))
            results = {p.peer_id: {"status": "open", **self._world()} for p in scope}
        elif kind == GateKind.PENDING:
            pending = bool(admissible_units(list(self._peers.values()), self._admissible))
            results = {
                p.peer_id: {"status": "open", "pending": pending, **self._world()} for p in scope
            }
        elif kind == GateKind.VOTE:
            failed = sorted(
                pid for pid, a in arrivals.items() if a is None or a.payload.get("ok") is not True
            )
            results = {
                p.peer_id: {"status": "open", "ok": not failed, "failed": failed, **self._world()}
                for p in scope
            }
        elif kind == GateKind.ALL_REDUCE:
            results = self._open_all_reduce(group, scope, arrivals)
        else:
            results = self._open_sync(group, scope, arrivals)
        for p in scope:
            arrival = arrivals[p.peer_id]
            assert arrival is not None
            p.results[arrival.rid] = results[p.peer_id]

    def _open_all_reduce(
        self, group: int, scope: list[PeerRecord], arrivals: dict[str, Arrival | None]
    ) -> dict[str, dict[str, Any]]:
        stale = stale_stamps(scope, {p: a.payload for p, a in arrivals.items() if a is not None})
        if stale is not None:
            return stale
        # Every participant must describe the same operation, else the ring would mix
        # unrelated buffers: refuse it on all of them.
        refused = refuse_all_reduce(
            {pid: (a.payload, a.nonfinite) for pid, a in arrivals.items() if a is not None}
        )
        if refused is not None:
            logger.warning("master: all_reduce in group %d refused: %s", group, refused["message"])
            return {p.peer_id: dict(refused) for p in scope}
        op = self._rounds.new(GateKind.ALL_REDUCE, group, [p.peer_id for p in scope])
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
        self, group: int, scope: list[PeerRecord], arrivals: dict[str, Arrival | None]
    ) -> dict[str, dict[str, Any]]:
        payloads = {pid: a.payload for pid, a in arrivals.items() if a is not None}
        try:
            election = elect(payloads)
        except ElectionError as e:
            return {pid: {"error": ErrorCode.SYNC, "message": str(e)} for pid in payloads}
        op = self._rounds.new(GateKind.SYNC, group, list(payloads))
        addresses = {p.peer_id: p.address for p in scope}
        world = self._world()
        return {
            pid: {**plan, **world}
            for pid, plan in plans(election, payloads, addresses, op_id=op.op_id).items()
        }
