"""The peer's control client: its session with the master, requests with retry, gates and votes.

One ``ControlClient`` per communicator. It owns two kinds of connection to the master:

- the *session* connection, which registers and then heartbeats from a background thread; when it
  breaks (the master restarted) the thread re-registers, telling the new master the world this
  peer knew;
- *control* connections by channel (``"main"`` for phases and votes, ``"watch"`` for the watcher
  of a running ring, ``"probe"`` for ``Communicator.live_revision``, so none waits for another),
  which carry one request at a time and reconnect until the caller's deadline.

On top of ``request`` it offers the phase protocol every collective uses: ``gate`` (wait until the
scope arrived), ``vote`` / ``watch_verdict`` (an all-reduce's commit vote) and ``sync_done`` (a
shared-state round). Shared-state sync and point-to-point use it instead of a communicator's
internals. Thread-safe; requests of one channel are serialised.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from lowcomm.comm import _frames, _handshake
from lowcomm.comm._protocol import (
    KIND_REQUEST,
    KIND_RESPONSE,
    MAX_CONTROL_FRAME_BYTES,
    ErrorCode,
    GateKind,
    GateRequest,
    HeartbeatRequest,
    LeaveGateRequest,
    LeaveRequest,
    OpReport,
    RegisterRequest,
    Request,
    StatusRequest,
    SyncDoneRequest,
    VerdictRequest,
    VoteRequest,
    WorldEntry,
    describe_gate,
    error_for,
    to_wire,
)
from lowcomm.comm.errors import (
    CommError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
    TopologyError,
)

__all__ = ["CHANNELS", "ControlClient"]

logger = logging.getLogger(__name__)

CHANNELS = ("main", "watch", "probe")


class ControlClient:
    """A peer's session and requests with the master (see the module docstring).

    Args:
        master_address: ``(host, port)`` of the master.
        peer_id: this peer's id (unique in the run).
        peer_group: the peer group it all-reduces and syncs state with.
        token: the normalized run token (None: no auth).
        encryption: seal the frames of every connection (see ``_handshake``).
        poll_s: the longest one request waits at the master before asking again.
        heartbeat_interval_s: seconds between heartbeats; None: a quarter of the master's
            heartbeat timeout.
        replica: ``(replica_id, replica_rank, num_replica_ranks)``: this peer is one rank of a
            replica the master admits and evicts as one unit; None: a peer on its own.
    """

    def __init__(
        self,
        master_address: tuple[str, int],
        *,
        peer_id: str,
        peer_group: int,
        token: bytes | None,
        poll_s: float,
        heartbeat_interval_s: float | None,
        replica: tuple[str, int, int] | None = None,
        encryption: bool = True,
    ) -> None:
        self.master_address = master_address
        self.peer_id = peer_id
        self.peer_group = peer_group
        self.token = token
        self.encryption = encryption
        self._poll_s = poll_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._cond = threading.Condition()
        self._channel_locks = {c: threading.Lock() for c in CHANNELS}
        self._ctls: dict[str, _frames.Connection | None] = dict.fromkeys(CHANNELS)
        self._session: _frames.Connection | None = None
        self._session_thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None
        self._epoch: str | None = None
        self._accepted = False
        self._evicted: str | None = None
        self.closed = threading.Event()
        self._world: list[dict[str, Any]] = []
        self._join_seq = -1
        self.revision = 0
        self.heartbeat_timeout_s = 10.0
        self.config_blob = b""
        self.replica = replica
        self.pending_replicas: dict[str, dict[str, Any]] = {}  # as of the last phase
        self.admission = ""  # why the master has not admitted this peer yet (while pending)
        # This peer's secret: registration hands it to the master (every master it registers
        # with: it survives restarts), every later request carries it, so no other token holder
        # can act for this peer.
        self._secret = secrets.token_hex(16)
        # This peer's latest all-reduce and where it stands in it: told to every master it
        # registers with, so a restarted one can resolve an operation it never saw.
        self._last_op: OpReport | None = None
        # Requests answered by the master (every channel): an all-reduce reports how many it made.
        self._round_trips = 0
        self._round_trips_lock = threading.Lock()

    @property
    def round_trips(self) -> int:
        """Requests to the master that got an answer so far, all channels together (heartbeats
        on the session connection not included)."""
        return self._round_trips

    def report_op(self, report: OpReport) -> None:
        """Records where this peer stands in its latest all-reduce (see ``_rounds``). Call it
        before the step it names becomes visible (before the vote is sent, before applying)."""
        with self._cond:
            self._last_op = report

    # ------------------------------------------------------------------ the world as last seen
    @property
    def world(self) -> list[dict[str, Any]]:
        """The accepted peers (``peer_id``, ``peer_group``, ``address``, ``join_seq``) in join
        order, as of this peer's last phase."""
        with self._cond:
            return list(self._world)

    def address_of(self, peer_id: str) -> tuple[str, int]:
        """The listen address of accepted peer ``peer_id``; ``TopologyError`` if it is not one."""
        self.check_usable()
        world = self.world
        for p in world:
            if p["peer_id"] == peer_id:
                return str(p["address"][0]), int(p["address"][1])
        raise TopologyError(
            f"peer {peer_id} is not in this peer's view of the world "
            f"({[p['peer_id'] for p in world]}); call update_topology() or check the id"
        )

    def check_usable(self) -> None:
        """Raises ``TopologyError`` unless this peer is accepted, not evicted and not closed."""
        if self._evicted is not None:
            raise TopologyError(
                f"peer {self.peer_id} was evicted ({self._evicted}); create a new Communicator "
                "and connect() to rejoin"
            )
        if self.closed.is_set():
            raise TopologyError("the communicator is closed")
        if not self._accepted:
            raise TopologyError("not accepted into the run yet: call connect() first")

    def poll(self, deadline: float) -> float:
        """How long the next request may wait at the master."""
        return max(0.0, min(self._poll_s, deadline - time.monotonic()))

    # ------------------------------------------------------------------ session
    def start_session(self, address: tuple[str, int], *, deadline: float) -> None:
        """Registers (advertising ``address`` for the ring and p2p) and starts heartbeating."""
        self._address = address
        self._register(rejoin=False, deadline=deadline)
        if self._session_thread is not None:
            return
        self._session_thread = threading.Thread(
            target=self._session_loop, name=f"lowcomm-session-{self.peer_id}", daemon=True
        )
        self._session_thread.start()

    def wait_accepted(self, *, deadline: float) -> None:
        """Polls the master until this peer is accepted; ``CommTimeoutError`` past ``deadline``."""
        while True:
            resp = self.request(
                StatusRequest(peer_id=self.peer_id, wait_s=self.poll(deadline)), deadline=deadline
            )
            self._raise_for(resp, "connect()")
            self.admission = str(resp.get("admission", ""))
            if resp.get("accepted"):
                with self._cond:
                    self._accepted = True
                self._update_world(resp)
                return
            if time.monotonic() >= deadline:
                why = self.admission or (
                    "the running peers have not called update_topology() (or there are none "
                    "and the master did not admit this peer)"
                )
                raise CommTimeoutError(f"peer {self.peer_id} was not accepted in time: {why}")

    def close(self, timeout_s: float) -> None:
        """Leaves the run (the master removes this peer at once), marks the client closed and
        closes every connection. Idempotent."""
        if self.closed.is_set():
            return
        if self._session is not None and self._evicted is None:
            with contextlib.suppress(CommError, OSError):
                self.request(
                    LeaveRequest(peer_id=self.peer_id),
                    deadline=time.monotonic() + timeout_s,
                    retry=False,
                )
        self.closed.set()
        for conn in (*self._ctls.values(), self._session):
            if conn is not None:
                conn.close()

    def join(self, timeout_s: float) -> None:
        """Waits for the heartbeat thread to end (after ``close``)."""
        t = self._session_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=timeout_s)

    def _register(self, *, rejoin: bool, deadline: float) -> None:
        """Opens the session connection and registers (or re-registers after a master restart)."""
        assert self._address is not None
        conn, _hello = _handshake.connect(
            self.master_address,
            token=self.token,
            encryption=self.encryption,
            hello={"role": "session", "peer_id": self.peer_id},
            timeout_s=max(0.1, min(10.0, deadline - time.monotonic())),
            max_frame_bytes=MAX_CONTROL_FRAME_BYTES,
        )
        world = self.world
        req = RegisterRequest(
            peer_id=self.peer_id,
            peer_group=self.peer_group,
            address=self._address,
            accepted=rejoin and self._accepted,
            rejoin=rejoin,
            revision=self.revision,
            join_seq=self._join_seq,
            world=[
                WorldEntry(
                    peer_id=str(p["peer_id"]),
                    peer_group=int(p["peer_group"]),
                    address=(str(p["address"][0]), int(p["address"][1])),
                    join_seq=int(p.get("join_seq", -1)),
                    replica_id=str(p.get("replica_id", "")),
                    replica_rank=int(p.get("replica_rank", 0)),
                    num_replica_ranks=int(p.get("num_replica_ranks", 0)),
                )
                for p in world
            ]
            if rejoin
            else [],
            **_replica_fields(self.replica),
            last_op=self._last_op,
        )
        try:
            conn.send_json(KIND_REQUEST, {**to_wire(req), "secret": self._secret}, timeout_s=10.0)
            _kind, _tag, resp = conn.recv_json(timeout_s=10.0)
        except BaseException:
            conn.close()
            raise
        if resp.get("error"):
            conn.close()
            self._raise_for(resp, "registering with the master")
        self.heartbeat_timeout_s = float(resp["heartbeat_timeout_s"])
        self.config_blob = base64.b64decode(resp.get("config_blob", ""))
        with self._cond:
            old, self._session = self._session, conn
            self._epoch = str(resp["epoch"])
            self._cond.notify_all()
        if old is not None:
            old.close()
        if rejoin:
            logger.info("peer %s re-registered with master epoch %s", self.peer_id, self._epoch)

    def _session_loop(self) -> None:
        """Heartbeats on the session connection; re-registers when the master restarted."""
        interval = self._heartbeat_interval_s or self.heartbeat_timeout_s / 4
        heartbeat = to_wire(HeartbeatRequest(peer_id=self.peer_id))
        while not self.closed.wait(interval if self._session_alive() else 0.2):
            conn = self._session
            try:
                if conn is None or conn.closed:
                    self._register(rejoin=True, deadline=time.monotonic() + 5.0)
                    continue
                conn.send_json(KIND_REQUEST, {**heartbeat, "secret": self._secret}, timeout_s=5.0)
                _kind, _tag, resp = conn.recv_json(timeout_s=5.0)
                if resp.get("error") == ErrorCode.EVICTED:
                    self._evicted = str(resp.get("message"))
                    logger.error("peer %s: %s", self.peer_id, self._evicted)
                    conn.close()
                    return
                if resp.get("error") == ErrorCode.UNKNOWN_PEER:
                    conn.close()
            except (CommError, OSError) as e:
                if self.closed.is_set():
                    return
                if isinstance(e, TopologyError) and self._evicted is not None:
                    return
                logger.info("peer %s: master session lost (%s); reconnecting", self.peer_id, e)
                if conn is not None:
                    conn.close()

    def _session_alive(self) -> bool:
        # A broken session re-registers within 0.2 s of the master coming back (the master's
        # first_peer_grace_s counts on it), not a heartbeat interval later.
        conn = self._session
        return conn is not None and not conn.closed

    # ------------------------------------------------------------------ requests
    def request(
        self, req: Request, *, deadline: float, retry: bool = True, channel: str = "main"
    ) -> dict[str, Any]:
        """One request/response on the control connection of ``channel``, reconnecting (and
        waiting for the session to re-register after a master restart) until ``deadline``.

        Raises:
            PeerFailureError: the master stayed unreachable (or ``retry=False`` and it failed once).
        """
        wire = to_wire(req)
        wait_s = float(getattr(req, "wait_s", 0.0))
        last: Exception | None = None
        while True:
            with self._channel_locks[channel]:
                conn = self._ctls[channel]
                try:
                    if conn is None or conn.closed:
                        self._ctls[channel] = conn = None
                        conn, _ = _handshake.connect(
                            self.master_address,
                            token=self.token,
                            encryption=self.encryption,
                            hello={"role": "control", "peer_id": self.peer_id},
                            timeout_s=max(0.1, min(5.0, deadline - time.monotonic())),
                            max_frame_bytes=MAX_CONTROL_FRAME_BYTES,
                        )
                        self._ctls[channel] = conn
                    # The secret of the session registered now (it changes after a restart).
                    send_s, reply_s = 10.0, wait_s + 10.0
                    if channel == "probe":
                        # A probe is a quick look: a frozen master must not hold it past its
                        # deadline (the other channels keep their slack for a master under load).
                        left = max(0.1, deadline - time.monotonic())
                        send_s, reply_s = min(send_s, left), min(reply_s, left)
                    conn.send_json(KIND_REQUEST, {**wire, "secret": self._secret}, timeout_s=send_s)
                    kind, _tag, resp = conn.recv_json(timeout_s=reply_s)
                    if kind != KIND_RESPONSE or not isinstance(resp, dict):
                        raise ProtocolError(f"unexpected frame kind {kind} from the master")
                    with self._round_trips_lock:
                        self._round_trips += 1
                except (PeerFailureError, CommTimeoutError, ProtocolError, OSError) as e:
                    if conn is not None:
                        conn.close()
                    last = e
                    resp = None
                except BaseException:
                    # Anything else (an interrupt, a bug) may leave this request's reply unread:
                    # the next request on the connection would read it as its own answer.
                    if conn is not None:
                        conn.close()
                    raise
            if resp is not None and resp.get("error") != ErrorCode.UNKNOWN_PEER:
                return resp
            if not retry or time.monotonic() >= deadline:
                raise PeerFailureError(
                    f"the master at {self.master_address[0]}:{self.master_address[1]} is "
                    f"unreachable or lost this peer ({last or resp}); start it again on the same "
                    "address: peers re-register on their own"
                )
            if resp is not None:
                # The master restarted and does not know us yet: the session re-registers.
                # Close the session only while it still belongs to the old master: closing a
                # session already registered with this one would get us evicted.
                with self._cond:
                    if self._session is not None and self._epoch != resp.get("epoch"):
                        self._session.close()
                    self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            else:
                time.sleep(0.1)

    def gate(
        self,
        kind: GateKind,
        key: str,
        payload: dict[str, Any],
        deadline: float,
        *,
        nonfinite: bool = False,
    ) -> dict[str, Any]:
        """Waits at a phase gate until every peer of its scope arrived; returns the master's
        answer. On timeout (or any failure) tells the master this peer left the gate.
        ``nonfinite``: this peer's all-reduce contribution holds NaN/inf (every peer then gets
        ``NonFiniteError`` when the gate opens)."""
        rid = uuid.uuid4().hex
        what = describe_gate(kind, key)
        try:
            while True:
                req = GateRequest(
                    peer_id=self.peer_id,
                    kind=kind,
                    key=key,
                    payload=payload,
                    rid=rid,
                    nonfinite=nonfinite,
                    wait_s=self.poll(deadline),
                )
                resp = self.request(req, deadline=deadline)
                if resp.get("status") == "open":
                    self._update_world(resp)
                    return resp
                self._raise_for(resp, what)
                if time.monotonic() >= deadline:
                    raise CommTimeoutError(
                        f"{what} timed out waiting for peers "
                        f"{resp.get('waiting_for')}: they never reached this phase (stalled, or "
                        "busy in a long step); they are evicted if they stop heartbeating"
                    )
        except CommError:
            self.leave_gate(rid)
            raise

    def leave_gate(self, rid: str) -> None:
        """Tells the master (best effort, bounded) that this peer gave up gate arrival ``rid``."""
        with contextlib.suppress(CommError, OSError):
            self.request(
                LeaveGateRequest(peer_id=self.peer_id, rid=rid),
                deadline=time.monotonic() + 2.0,
                retry=False,
            )

    def vote(
        self, op_id: str, ok: bool, deadline: float, *, group: int, participants: list[str]
    ) -> dict[str, Any]:
        """Votes on all-reduce ``op_id``; returns the master's verdict once every participant
        voted (or one failed). ``CommTimeoutError`` if no verdict came in time. ``group`` and
        ``participants`` (the gate's) let a restarted master adopt the operation (``_rounds``);
        the vote goes on through a master restart (the request waits for the re-registration)."""
        # A peer that finished its ring waits for the others' votes; a stalled participant is
        # evicted after the heartbeat timeout, which aborts the vote, so this wait is bounded.
        # A restarted master decides once the participants are back (or evicted, after the
        # heartbeat timeout), so the same bound covers a restart.
        vote_deadline = max(deadline, time.monotonic() + 2 * self.heartbeat_timeout_s + 5.0)
        while True:
            resp = self.request(
                VoteRequest(
                    peer_id=self.peer_id,
                    op_id=op_id,
                    ok=ok,
                    group=group,
                    participants=participants,
                    wait_s=self.poll(vote_deadline),
                ),
                deadline=vote_deadline,
            )
            self._raise_for(resp, "all_reduce commit vote")
            if resp.get("verdict"):
                return resp
            if time.monotonic() >= vote_deadline:
                raise CommTimeoutError(
                    f"all_reduce commit vote timed out waiting for {resp.get('waiting_for')}"
                )

    def watch_verdict(
        self,
        op_id: str,
        *,
        on_abort: Callable[[], None],
        done: threading.Event,
        deadline: float,
        grace_s: float = 0.25,
    ) -> None:
        """While an all-reduce runs longer than a moment, asks the master whether it was already
        aborted (a participant evicted: dead, or silent past the heartbeat timeout) and then calls
        ``on_abort`` (which closes the ring), so a stalled peer costs the heartbeat timeout, not
        ``timeout_s``. Returns when ``done`` is set, on abort, or at ``deadline``. The first
        request leaves ``grace_s`` after the call (0: a caller that waited already)."""
        # A short grace spares the fast (loopback) operations the request; after it, an abort
        # reaches this peer within one master round trip of the eviction.
        if done.wait(grace_s):
            return
        while not done.is_set() and time.monotonic() < deadline:
            try:
                resp = self.request(
                    VerdictRequest(peer_id=self.peer_id, op_id=op_id, wait_s=self.poll(deadline)),
                    deadline=deadline,
                    retry=False,
                    channel="watch",
                )
            except CommError:
                return
            if resp.get("verdict") == "abort" and not done.is_set():
                logger.warning("aborting the running all-reduce: %s", resp.get("reason", "aborted"))
                on_abort()
                return

    def sync_done(self, op_id: str, ok: bool, deadline: float) -> dict[str, Any]:
        """Tells the master this peer finished shared-state round ``op_id``; waits until every
        participant has (or ``deadline``) and returns the master's last answer. A failed peer
        (``ok=False``) that cannot reach the master gets ``{}``."""
        while True:
            try:
                resp = self.request(
                    SyncDoneRequest(
                        peer_id=self.peer_id,
                        op_id=op_id,
                        ok=ok,
                        wait_s=min(0.2, max(0.0, deadline - time.monotonic())),
                    ),
                    deadline=deadline,
                )
            except CommError:
                if not ok:
                    return {}
                raise
            self._raise_for(resp, "sync_shared_state()")
            if resp.get("verdict") or time.monotonic() >= deadline:
                return resp

    # ------------------------------------------------------------------ answers
    def _raise_for(self, resp: dict[str, Any], what: str) -> None:
        err = resp.get("error")
        if err is None:
            return
        if err == ErrorCode.EVICTED:
            self._evicted = str(resp.get("message", "evicted"))
        raise error_for(str(err), f"{what}: {resp.get('message', err)}", resp)

    def _update_world(self, resp: dict[str, Any]) -> None:
        if "world" not in resp:
            return
        with self._cond:
            self._world = list(resp["world"])
            self.revision = int(resp.get("revision", self.revision))
            self.pending_replicas = dict(resp.get("pending_replicas", {}))
            for p in self._world:
                if p["peer_id"] == self.peer_id:
                    self._join_seq = int(p.get("join_seq", -1))


def _replica_fields(replica: tuple[str, int, int] | None) -> dict[str, Any]:
    if replica is None:
        return {}
    replica_id, rank, num_ranks = replica
    return {"replica_id": replica_id, "replica_rank": rank, "num_replica_ranks": num_ranks}
