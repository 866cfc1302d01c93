"""The peer's side of a run: join through the master, agree on phases, all-reduce, send and receive.

Programming model (PCCL's, with its hangs turned into errors)::

    comm = Communicator("10.0.0.1:48000", peer_group=0, token=token)
    comm.connect(timeout_s=60)                  # returns once accepted into the running world
    while training:
        if comm.are_peers_pending():            # every accepted peer asks; all get one answer
            comm.update_topology()              # every accepted peer calls it; admits joiners
        comm.sync_shared_state(state)           # bit-identical shared state everywhere
        comm.all_reduce(pseudogradient, op="avg", quantization="uint8")

Every call that involves other peers is a *phase*: it waits at the master until every accepted
peer of its scope (the world, or the peer group for ``all_reduce`` and ``sync_shared_state``)
has arrived at the same phase. A peer that calls a different phase meanwhile makes both fail
with ``TopologyError`` (never a hang); a peer that dies is evicted at once (its session
connection closes); one that stops responding is evicted after the master's heartbeat timeout.

Collectives (``all_reduce``, ``all_reduce_async``, ``update_topology``, ``are_peers_pending``,
``sync_shared_state``) run on one worker thread per communicator, in submission order, so several
``all_reduce_async`` may be in flight (told apart by ``tag``) while the caller computes; they are
executed one after the other, which keeps every peer's phase sequence identical. ``send``/``recv``
run on their own threads and need no master round trip.

An all-reduce is applied only after every participant voted that its ring finished (a commit vote
at the master): on any failure every participant raises and its tensor is untouched.

This module holds the TCP backend's facade, its worker queue and the all-reduce with its vote and
ring cache; the master session lives in ``_control``, point-to-point in ``_p2p``, and the choice of
backend in ``backend.open_communicator``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lowcomm.comm import _handshake, shared_state
from lowcomm.comm._allreduce import AllReduceInfo, AutoQuantization, VotedAllReduce
from lowcomm.comm._control import ControlClient
from lowcomm.comm._ops import check_all_reduce_args
from lowcomm.comm._p2p import PointToPoint
from lowcomm.comm._protocol import GateKind, StatusRequest, error_for, parse_address
from lowcomm.comm._worker import Handle, TaskQueue, all_reduce_with_retry, deadline_after
from lowcomm.comm.listener import PeerListener
from lowcomm.comm.shaper import Shaper
from lowcomm.comm.shared_state import SharedState, SyncInfo
from lowcomm.compression import Codec, get_codec, resolve_codec
from lowcomm.faults import FaultInjector

__all__ = ["AllReduceInfo", "CommConfig", "Communicator", "Handle", "VoteResult"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class CommConfig:
    """How a ``Communicator`` talks to the master and its peers.

    Args:
        num_connections: TCP connections per ring neighbour that one all-reduce stripes over.
            None (default): 4 (a long, fat WAN link needs several windows in flight), or 1 when
            both ring neighbours are on this host (loopback: more only cost CPU).
        listen_host: interface the peer-to-peer listener binds.
        advertise_host: address other peers use to reach this one (default ``listen_host``).
        timeout_s: default ``timeout_s`` of every blocking call that is not given one.
        heartbeat_interval_s: seconds between heartbeats; default a quarter of the master's
            heartbeat timeout (which the master announces at registration).
        poll_s: the longest one request waits at the master before the peer asks again.
        shaper: optional WAN emulation applied to this peer's sends.
        faults: optional fault injector for this peer's points (``comm.gate``, ``state.serve``,
            ``p2p.send``, ``ring.send``; see ``lowcomm.faults``). None in production.
        thread_per_connection: the ring gives every connection its own sending and receiving
            thread (True: what a long, fat WAN link needs so that one full window does not hold
            back the others) or uses one of each for all connections (False: fewer threads and
            GIL hand-offs, faster where the CPU is the limit). None (default): False when both
            ring neighbours are on this host (loopback), True otherwise.
        encryption: seal (encrypt and authenticate) every frame after the handshake, on every
            connection (default). False only on a trusted network, and then on the master and
            every peer too: the handshake fails if the two ends differ. The token proof is made
            either way.
    """

    num_connections: int | None = None
    listen_host: str = "127.0.0.1"
    advertise_host: str | None = None
    timeout_s: float = 60.0
    heartbeat_interval_s: float | None = None
    poll_s: float = 0.5
    shaper: Shaper | None = None
    faults: FaultInjector | None = None
    thread_per_connection: bool | None = None
    encryption: bool = True

    def __post_init__(self) -> None:
        if self.num_connections is not None and not 1 <= self.num_connections <= 64:
            raise ValueError(f"num_connections must be in [1, 64], got {self.num_connections}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.heartbeat_interval_s is not None and not self.heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if not 0 < self.poll_s <= 1.0:
            raise ValueError(f"poll_s must be in (0, 1], got {self.poll_s}")


@dataclass(frozen=True)
class VoteResult:
    """The outcome of ``Communicator.vote``: ``ok`` if every accepted peer voted ok; ``failed``
    the peers that voted fail; ``revision`` and ``peers`` the world the vote closed on (a peer
    lost before it closed is missing there, and the revision moved)."""

    ok: bool
    failed: list[str]
    revision: int
    peers: list[str]


class Communicator:
    """One peer of a run over lowcomm's own TCP transport. See the module docstring for the
    programming model; ``lowcomm.comm.open_communicator`` picks this or the PCCL backend.

    Args:
        master_address: ``"host:port"`` of the master.
        peer_group: peers with the same group all-reduce and sync state together (under FSDP:
            the local shard index).
        token: the run token; must match the master's and every peer's.
        config: see ``CommConfig``.
        replica_id, replica_rank, num_replica_ranks: this peer is rank ``replica_rank`` of the
            ``num_replica_ranks`` ranks of replica ``replica_id`` (one torchrun job; under FSDP,
            rank = local shard index = ``peer_group``). The master admits a replica's ranks
            together (all of them at one ``update_topology()``, or none) and evicts them together
            (one rank lost: every rank's next call raises ``TopologyError`` naming it). Leave them
            unset for a peer on its own. ``lowcomm.init()`` sets them from torchrun's variables.

    Thread safety: public methods may be called from any thread; collectives are serialised on
    the worker thread in call order. ``close()`` is idempotent.
    """

    backend = "tcp"

    def __init__(
        self,
        master_address: str | tuple[str, int],
        *,
        peer_group: int = 0,
        token: bytes | str | None = None,
        config: CommConfig | None = None,
        replica_id: str | None = None,
        replica_rank: int = 0,
        num_replica_ranks: int = 1,
    ) -> None:
        if not isinstance(peer_group, int) or peer_group < 0:
            raise ValueError(f"peer_group must be an int >= 0, got {peer_group!r}")
        if replica_id is not None and not (
            replica_id and num_replica_ranks >= 1 and 0 <= replica_rank < num_replica_ranks
        ):
            raise ValueError(
                f"replica_id must be non-empty and 0 <= replica_rank < num_replica_ranks, got "
                f"{replica_id!r}, {replica_rank}, {num_replica_ranks}"
            )
        self.replica_id = replica_id
        self.master_address = parse_address(master_address)
        self.peer_group = peer_group
        self.config = config or CommConfig()
        self.peer_id = uuid.uuid4().hex[:12]
        self._control = ControlClient(
            self.master_address,
            peer_id=self.peer_id,
            peer_group=peer_group,
            token=_handshake.normalize_token(token),
            poll_s=self.config.poll_s,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            replica=None if replica_id is None else (replica_id, replica_rank, num_replica_ranks),
            encryption=self.config.encryption,
        )
        self._worker = TaskQueue(f"lowcomm-worker-{self.peer_id}", check=self._control.check_usable)
        self._listener: PeerListener | None = None
        self._p2p: PointToPoint | None = None
        self._all_reduce: VotedAllReduce | None = None  # made by connect(), with the listener

    # ------------------------------------------------------------------ properties
    @property
    def world_size(self) -> int:
        """Accepted peers of the run (all groups), as of this peer's last phase."""
        return len(self._control.world)

    @property
    def peer_group_world_size(self) -> int:
        """Accepted peers of this peer's group, as of this peer's last phase."""
        return sum(1 for p in self._control.world if p["peer_group"] == self.peer_group)

    @property
    def rank(self) -> int:
        """This peer's position in its group's ring order (join order); -1 before acceptance."""
        group = [p["peer_id"] for p in self._control.world if p["peer_group"] == self.peer_group]
        return group.index(self.peer_id) if self.peer_id in group else -1

    @property
    def peers(self) -> list[str]:
        """Peer ids of the accepted world in join order (for ``send``/``recv``)."""
        return [p["peer_id"] for p in self._control.world]

    @property
    def peer_groups(self) -> dict[str, int]:
        """Peer id -> peer group of the accepted world, in join order, as of the last phase."""
        return {str(p["peer_id"]): int(p["peer_group"]) for p in self._control.world}

    @property
    def replicas(self) -> dict[str, list[int]]:
        """Accepted replicas (``replica_id`` -> its accepted ranks), as of this peer's last phase.
        Peers on their own are not listed."""
        out: dict[str, list[int]] = {}
        for p in self._control.world:
            if p.get("num_replica_ranks"):
                out.setdefault(str(p["replica_id"]), []).append(int(p["replica_rank"]))
        return {r: sorted(ranks) for r, ranks in out.items()}

    @property
    def pending_replicas(self) -> dict[str, dict[str, Any]]:
        """Replicas with ranks waiting to be admitted, as of this peer's last phase:
        ``replica_id`` -> ``{"num_ranks": n, "ranks": [the ranks registered so far]}``."""
        return dict(self._control.pending_replicas)

    @property
    def revision(self) -> int:
        """The master's membership revision as of this peer's last phase."""
        return self._control.revision

    @property
    def heartbeat_timeout_s(self) -> float:
        """The master's heartbeat timeout (announced at registration)."""
        return self._control.heartbeat_timeout_s

    @property
    def config_blob(self) -> bytes:
        """The run's configuration as given to the master (downloaded at ``connect``)."""
        return self._control.config_blob

    @property
    def listen_address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("connect() first")
        return self._advertised()

    # ------------------------------------------------------------------ connect / close
    def connect(
        self,
        timeout_s: float | None = None,
        *,
        before_admission: Callable[[bytes], None] | None = None,
    ) -> None:
        """Registers with the master and blocks until this peer is accepted into the world.

        The first peer of an empty run is accepted at once; later ones when the running peers
        next call ``update_topology()``. ``connect`` returns at the same point as that
        ``update_topology()``, so the joiner's next phase must be the one the running peers
        call after it.

        ``before_admission(config_blob)`` runs once registered, before this peer asks to be
        admitted: a joiner checks the run's configuration and does its slow set-up there, so the
        running peers never admit a peer that then refuses the run or keeps them waiting. If it
        raises, the communicator is closed and the error propagates.

        Raises:
            AuthenticationError: the master does not know this run's token.
            CommTimeoutError: not accepted within ``timeout_s``.
            PeerFailureError: the master is unreachable.
        """
        deadline = self._deadline(timeout_s)
        if self._listener is None:
            self._listener = PeerListener(
                host=self.config.listen_host,
                port=0,
                token=self._control.token,
                shaper=self.config.shaper,
                encryption=self.config.encryption,
            )
            self._p2p = PointToPoint(
                self._control,
                self._listener,
                shaper=self.config.shaper,
                faults=self.config.faults,
            )
            self._all_reduce = VotedAllReduce(
                self._control,
                self._listener,
                self.config,
                peer_id=self.peer_id,
                peer_group=self.peer_group,
            )
        self._control.start_session(self._advertised(), deadline=deadline)
        if before_admission is not None:
            try:
                before_admission(self.config_blob)
            except BaseException:
                self.close()
                raise
        self._worker.start()
        self._control.wait_accepted(deadline=deadline)
        logger.info(
            "peer %s accepted: world %d, group %d size %d",
            self.peer_id,
            self.world_size,
            self.peer_group,
            self.peer_group_world_size,
        )

    def close(self, timeout_s: float = 5.0) -> None:
        """Leaves the run (the master removes this peer at once) and closes every connection."""
        if self._control.closed.is_set():
            return
        self._control.close(timeout_s)
        self._worker.close()
        if self._all_reduce is not None:
            self._all_reduce.close()
        if self._listener is not None:
            self._listener.close()
        if self._p2p is not None:
            self._p2p.close()
        self._control.join(timeout_s)
        self._worker.join(timeout_s)

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ phases
    def are_peers_pending(self, timeout_s: float | None = None) -> bool:
        """True if peers wait to be admitted. Every accepted peer must call it (a phase); all get
        the same answer, so all take the same branch."""
        resp = self._submit(
            lambda d: self._control.gate(GateKind.PENDING, "", {}, d),
            timeout_s,
            "are_peers_pending()",
        ).wait()
        return bool(resp["pending"])

    def update_topology(self, timeout_s: float | None = None) -> None:
        """Admits pending peers. Every accepted peer must call it; returns once all have."""
        self._submit(
            lambda d: self._control.gate(GateKind.TOPOLOGY, "", {}, d),
            timeout_s,
            "update_topology()",
        ).wait()

    def vote(self, key: str, ok: bool, timeout_s: float | None = None) -> VoteResult:
        """A world-wide ok/fail vote (a phase: every accepted peer calls it with the same ``key``).
        Returns once every accepted peer voted; every peer gets the same ``VoteResult``. A peer
        lost meanwhile (dead: at once; silent: after the heartbeat timeout) is not waited for:
        the vote closes on the survivors, with the new ``revision``."""
        resp = self._submit(
            lambda d: self._control.gate(GateKind.VOTE, str(key), {"ok": bool(ok)}, d),
            timeout_s,
            f"vote({key!r})",
        ).wait()
        return VoteResult(
            ok=bool(resp["ok"]),
            failed=[str(p) for p in resp.get("failed", [])],
            revision=int(resp["revision"]),
            peers=[str(p["peer_id"]) for p in resp["world"]],
        )

    def live_revision(self, timeout_s: float = 5.0) -> int:
        """The master's membership revision now (one request, on a channel of its own), without
        changing this peer's view of the world: a caller waiting on ``recv`` polls it to learn
        that a peer was lost (the revision moves when one is evicted or admitted)."""
        self._control.check_usable()
        resp = self._control.request(
            StatusRequest(peer_id=self.peer_id),
            deadline=self._deadline(timeout_s),
            retry=False,
            channel="probe",
        )
        if resp.get("error"):
            raise error_for(str(resp["error"]), f"live_revision(): {resp.get('message')}", resp)
        return int(resp["revision"])

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        out: torch.Tensor | None = None,
        quantization: str | Codec | None = None,
        tag: int = 0,
        timeout_s: float | None = None,
        stamp: dict[str, int] | None = None,
        check_finite: bool = False,
    ) -> AllReduceInfo:
        """All-reduces ``tensor`` over the accepted peers of this peer group, in place or into
        ``out``. Every peer of the group must call it with the same op, size, dtype, codec
        (name and parameters), tag.

        ``stamp`` names the state the caller's tensor belongs to (the outer loops pass
        ``{"outer_step": ..., "revision": ...}``); the master compares the participants' stamps
        before any data moves, and if they differ refuses the all-reduce on every participant
        with ``StaleStateError`` (its ``stamps`` say who is behind): never a silent average.

        Blocks until committed everywhere; runs on the communicator's worker thread after any
        queued ``all_reduce_async``, in submission order. On failure raises ``PeerFailureError`` (a peer died)
        or ``CommTimeoutError`` (a peer stalled), with ``tensor``/``out`` untouched on every peer;
        call it again (or use ``all_reduce_with_retry``) to reduce among the survivors. Peers in
        different phases or with different arguments all get ``TopologyError`` at once.

        ``quantization``: None (exact), a codec name (``"uint8"``) or ``Codec``, or ``"auto"``:
        uint8 where it is faster than fp32 on this ring, measured on the ring's first two large
        ops and agreed by all peers (``AutoQuantization``); ``AllReduceInfo.codec`` says which.

        ``check_finite``: refuse a contribution holding NaN or inf (one ``isfinite`` pass over
        the input before the ring); every peer then raises ``NonFiniteError`` naming the peer.
        Always on with a quantizing codec (it could not encode it).
        """
        result: AllReduceInfo = self.all_reduce_async(
            tensor,
            op,
            out=out,
            quantization=quantization,
            tag=tag,
            timeout_s=timeout_s,
            stamp=stamp,
            check_finite=check_finite,
        ).wait()
        return result

    def all_reduce_async(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        out: torch.Tensor | None = None,
        quantization: str | Codec | None = None,
        tag: int = 0,
        timeout_s: float | None = None,
        stamp: dict[str, int] | None = None,
        check_finite: bool = False,
    ) -> Handle:
        """Like ``all_reduce`` but returns a ``Handle`` at once. Several may be in flight; they
        run one after the other in submission order on the worker thread, so every peer must
        submit them in the same order (tags tell them apart; mismatched tags raise). Do not
        touch ``tensor``/``out`` until ``handle.wait()`` returned."""
        check_all_reduce_args(tensor, op, out=out, tag=tag)
        codec: Codec | AutoQuantization | None = (
            AutoQuantization(get_codec("uint8"))
            if quantization == "auto"
            else resolve_codec(quantization)
        )

        stamp = None if stamp is None else {str(k): int(v) for k, v in stamp.items()}

        def run(deadline: float) -> AllReduceInfo:
            assert self._all_reduce is not None  # _submit checked that connect() ran
            return self._all_reduce.run(
                tensor, op, out, codec, tag, deadline, stamp=stamp, check_finite=check_finite
            )

        return self._submit(run, timeout_s, f"all_reduce(tag={tag})")

    def all_reduce_with_retry(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        out: torch.Tensor | None = None,
        quantization: str | Codec | None = None,
        tag: int = 0,
        timeout_s: float | None = None,
        max_attempts: int = 3,
        check_finite: bool = False,
    ) -> AllReduceInfo:
        """``all_reduce`` that retries among the survivors after a peer failure or stall, at
        most ``max_attempts`` times in all (each attempt gets ``timeout_s``). A retry includes
        every peer still accepted: dead peers are evicted at once, stalled ones after the
        heartbeat timeout (the retry waits for that). Re-raises the last error."""
        return all_reduce_with_retry(
            lambda: self.all_reduce(
                tensor,
                op,
                out=out,
                quantization=quantization,
                tag=tag,
                timeout_s=timeout_s,
                check_finite=check_finite,
            ),
            max_attempts=max_attempts,
        )

    def sync_shared_state(
        self,
        state: SharedState,
        strategy: str = "enforce_popular",
        *,
        timeout_s: float | None = None,
    ) -> SyncInfo:
        """Makes ``state`` bit-identical on every accepted peer of this group (see
        ``lowcomm.comm.shared_state``). Every peer of the group must call it."""
        shared_state.validate_strategy(strategy)

        def run(deadline: float) -> SyncInfo:
            assert self._listener is not None
            return shared_state.sync(
                self._control,
                state,
                strategy,
                deadline,
                listener=self._listener,
                shaper=self.config.shaper,
                faults=self.config.faults,
            )

        result: SyncInfo = self._submit(run, timeout_s, "sync_shared_state()").wait()
        return result

    # ------------------------------------------------------------------ point to point
    def send(
        self, tensor: torch.Tensor, *, to: str, tag: int = 0, timeout_s: float | None = None
    ) -> None:
        """Sends ``tensor`` to accepted peer ``to``, which must call ``recv(from_=<this peer>,
        tag=tag)``. Blocks until the receiver acknowledged it. Raises ``PeerFailureError`` if the
        receiver is gone or refused it, ``CommTimeoutError`` past ``timeout_s``; either way the
        caller cannot tell whether the receiver got it (the ack may be what was lost).

        Messages of one (peer, tag) go in order over one authenticated connection kept between
        them; a connection either side dropped is replaced by a fresh one on the next message."""
        self.send_async(tensor, to=to, tag=tag, timeout_s=timeout_s).wait()

    def recv(
        self, out: torch.Tensor, *, from_: str, tag: int = 0, timeout_s: float | None = None
    ) -> torch.Tensor:
        """Receives into ``out`` (same shape and dtype as what the sender sent) from ``from_``."""
        result: torch.Tensor = self.recv_async(
            out, from_=from_, tag=tag, timeout_s=timeout_s
        ).wait()
        return result

    def send_async(
        self, tensor: torch.Tensor, *, to: str, tag: int = 0, timeout_s: float | None = None
    ) -> Handle:
        """Like ``send`` but returns a ``Handle`` at once (p2p runs on its own threads)."""
        deadline = self._deadline(timeout_s)
        return Handle(
            self._point_to_point().send(tensor, to=to, tag=tag, deadline=deadline), f"send(to={to})"
        )

    def recv_async(
        self, out: torch.Tensor, *, from_: str, tag: int = 0, timeout_s: float | None = None
    ) -> Handle:
        """Like ``recv`` but returns a ``Handle`` at once; do not touch ``out`` until it is done."""
        deadline = self._deadline(timeout_s)
        return Handle(
            self._point_to_point().recv(out, from_=from_, tag=tag, deadline=deadline),
            f"recv(from_={from_})",
        )

    # ------------------------------------------------------------------ internals
    def _deadline(self, timeout_s: float | None) -> float:
        return deadline_after(timeout_s, self.config.timeout_s)

    def _advertised(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.address
        return (self.config.advertise_host or host, int(port))

    def _point_to_point(self) -> PointToPoint:
        self._control.check_usable()
        assert self._p2p is not None
        return self._p2p

    def _submit(self, fn: Callable[[float], T], timeout_s: float | None, what: str) -> Handle:
        self._control.check_usable()
        return self._worker.submit(fn, self._deadline(timeout_s), what)
