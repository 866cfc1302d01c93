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
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import logging
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lowcomm.comm import _frames, _handshake
from lowcomm.comm.errors import (
    CommError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
    TopologyError,
)
from lowcomm.comm.master import KIND_REQUEST, KIND_RESPONSE, MAX_CONTROL_FRAME_BYTES, parse_address
from lowcomm.comm.shared_state import byte_view

if TYPE_CHECKING:
    from lowcomm.comm.listener import PeerListener
    from lowcomm.comm.ring import Ring
    from lowcomm.comm.shaper import Shaper
    from lowcomm.comm.shared_state import SharedState, SyncInfo
    from lowcomm.compression import Codec

__all__ = ["AllReduceInfo", "CommConfig", "Communicator", "Handle"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

OPS = ("sum", "avg", "min", "max")
BACKENDS = ("tcp", "pccl")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_all_reduce_args(
    tensor: torch.Tensor, op: str, *, out: torch.Tensor | None, tag: int
) -> None:
    """Raises ValueError naming the bad argument; shared by every backend's all_reduce."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _DTYPES:
        raise ValueError(
            f"all_reduce needs a float32, float16 or bfloat16 tensor, got "
            f"{getattr(tensor, 'dtype', type(tensor))}"
        )
    if out is not None and (out.shape != tensor.shape or out.dtype != tensor.dtype):
        raise ValueError(
            f"out must match tensor's shape and dtype: {tuple(out.shape)}/{out.dtype} vs "
            f"{tuple(tensor.shape)}/{tensor.dtype}"
        )
    if not 0 <= tag < 2**63:
        raise ValueError(f"tag must be in [0, 2**63), got {tag}")


# p2p payloads travel in frames of at most this size.
_P2P_FRAME_BYTES = 16 * 1024 * 1024
# Kept point-to-point connections per communicator (both directions): past it the oldest is
# closed, so a caller that uses a new tag per message does not pile up sockets.
_P2P_KEEP_MAX = 128
_KIND_P2P_HEADER = 0x48
_KIND_P2P_DATA = 0x49
_KIND_P2P_ACK = 0x4A


@dataclass(frozen=True, kw_only=True)
class CommConfig:
    """How a ``Communicator`` talks to the master and its peers.

    Args:
        num_connections: TCP connections per ring neighbour that one all-reduce stripes over.
        listen_host: interface the peer-to-peer listener binds.
        advertise_host: address other peers use to reach this one (default ``listen_host``).
        timeout_s: default ``timeout_s`` of every blocking call that is not given one.
        heartbeat_interval_s: seconds between heartbeats; default a quarter of the master's
            heartbeat timeout (which the master announces at registration).
        poll_s: the longest one request waits at the master before the peer asks again.
        shaper: optional WAN emulation applied to this peer's sends.
    """

    num_connections: int = 4
    listen_host: str = "127.0.0.1"
    advertise_host: str | None = None
    timeout_s: float = 60.0
    heartbeat_interval_s: float | None = None
    poll_s: float = 0.5
    shaper: Shaper | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_connections <= 64:
            raise ValueError(f"num_connections must be in [1, 64], got {self.num_connections}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.heartbeat_interval_s is not None and not self.heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if not 0 < self.poll_s <= 1.0:
            raise ValueError(f"poll_s must be in (0, 1], got {self.poll_s}")


@dataclass(frozen=True, kw_only=True)
class AllReduceInfo:
    """What one committed all-reduce did: ``world_size`` is the number of participants."""

    world_size: int
    tx_bytes: int
    rx_bytes: int
    seconds: float


class Handle:
    """An operation running on the communicator's worker thread (``all_reduce_async``, ...)."""

    def __init__(self, future: concurrent.futures.Future[Any], what: str) -> None:
        self._future = future
        self._what = what

    def done(self) -> bool:
        """True once the operation finished (successfully or not). Never blocks."""
        return self._future.done()

    def wait(self, timeout_s: float | None = None) -> Any:
        """Blocks until the operation finished and returns its result or raises its error.

        ``timeout_s=None`` waits for the operation's own timeout (it always has one). Raises
        ``CommTimeoutError`` if ``timeout_s`` passes first; the operation keeps running.
        """
        # Wait first, then take the result: the operation's own CommTimeoutError is a
        # TimeoutError too, and must reach the caller as it was raised, not as this wait's.
        done, _ = concurrent.futures.wait([self._future], timeout=timeout_s)
        if not done:
            raise CommTimeoutError(
                f"{self._what} did not finish within {timeout_s} s (it is still running)"
            )
        return self._future.result()


@dataclass
class _Task:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class Communicator:
    """One peer of a run. See the module docstring for the programming model.

    Args:
        master_address: ``"host:port"`` of the master.
        peer_group: peers with the same group all-reduce and sync state together (under FSDP:
            the local shard index).
        token: the run token; must match the master's and every peer's.
        config: see ``CommConfig``.
        backend: ``"tcp"`` (lowcomm's own, default) or ``"pccl"`` (the real PCCL where its wheel
            loads; see ``lowcomm.comm._pccl_backend`` for what differs). Raises
            ``BackendUnavailableError`` if PCCL does not load here.

    Thread safety: public methods may be called from any thread; collectives are serialised on
    the worker thread in call order. ``close()`` is idempotent.
    """

    def __new__(cls, *args: Any, backend: str = "tcp", **kwargs: Any) -> Communicator:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "pccl" and cls is Communicator:
            from lowcomm.comm._pccl_backend import PcclCommunicator

            return super().__new__(PcclCommunicator)
        return super().__new__(cls)

    def __init__(
        self,
        master_address: str | tuple[str, int],
        *,
        peer_group: int = 0,
        token: bytes | str | None = None,
        config: CommConfig | None = None,
        backend: str = "tcp",
    ) -> None:
        self.backend = backend
        if not isinstance(peer_group, int) or peer_group < 0:
            raise ValueError(f"peer_group must be an int >= 0, got {peer_group!r}")
        self.master_address = parse_address(master_address)
        self.peer_group = peer_group
        self._token = _handshake.normalize_token(token)
        self.config = config or CommConfig()
        self.peer_id = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        # Control connections by channel: "main" for phases and votes (the worker thread and
        # close()), "watch" for the watcher of a running ring, so neither waits for the other.
        self._ctl_locks = {"main": threading.Lock(), "watch": threading.Lock()}
        self._cond = threading.Condition(self._lock)
        self._ctls: dict[str, _frames.Connection | None] = {"main": None, "watch": None}
        self._session: _frames.Connection | None = None
        self._epoch: str | None = None
        self._accepted = False
        self._evicted: str | None = None
        self._closed = threading.Event()
        self._world: list[dict[str, Any]] = []
        self._join_seq = -1
        self.revision = 0
        self.heartbeat_timeout_s = 10.0
        self._config_blob = b""
        self._listener: PeerListener | None = None
        self._ring: Ring | None = None
        self._ring_id: str | None = None
        # Reused between all-reduces (all run on the worker thread, one at a time): a fresh
        # buffer per op costs a page fault per 4 KiB on first touch (pinned: a slow allocation).
        self._buffers: dict[tuple[str, torch.dtype, bool], torch.Tensor] = {}
        self._tasks: list[_Task] = []
        self._tasks_cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._p2p_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Point-to-point connections kept between messages, by ("out"/"in", peer, tag): a message
        # then costs one round trip (the ack) instead of TCP and auth handshakes as well. A
        # per-key lock keeps messages of one key in order; a connection in use is out of the dict.
        self._p2p_conns: dict[tuple[str, str, int], _frames.Connection] = {}
        self._p2p_locks: dict[tuple[str, str, int], threading.Lock] = {}

    # ------------------------------------------------------------------ properties
    @property
    def world_size(self) -> int:
        """Accepted peers of the run (all groups), as of this peer's last phase."""
        with self._lock:
            return len(self._world)

    @property
    def peer_group_world_size(self) -> int:
        """Accepted peers of this peer's group, as of this peer's last phase."""
        with self._lock:
            return sum(1 for p in self._world if p["peer_group"] == self.peer_group)

    @property
    def rank(self) -> int:
        """This peer's position in its group's ring order (join order); -1 before acceptance."""
        with self._lock:
            group = [p["peer_id"] for p in self._world if p["peer_group"] == self.peer_group]
        return group.index(self.peer_id) if self.peer_id in group else -1

    @property
    def peers(self) -> list[str]:
        """Peer ids of the accepted world in join order (for ``send``/``recv``)."""
        with self._lock:
            return [p["peer_id"] for p in self._world]

    @property
    def config_blob(self) -> bytes:
        """The run's configuration as given to the master (downloaded at ``connect``)."""
        return self._config_blob

    @property
    def listen_address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("connect() first")
        return self._advertised()

    # ------------------------------------------------------------------ connect / close
    def connect(self, timeout_s: float | None = None) -> None:
        """Registers with the master and blocks until this peer is accepted into the world.

        The first peer of an empty run is accepted at once; later ones when the running peers
        next call ``update_topology()``. ``connect`` returns at the same point as that
        ``update_topology()``, so the joiner's next phase must be the one the running peers
        call after it.

        Raises:
            AuthenticationError: the master does not know this run's token.
            CommTimeoutError: not accepted within ``timeout_s``.
            PeerFailureError: the master is unreachable.
        """
        from lowcomm.comm.listener import PeerListener

        deadline = self._deadline(timeout_s)
        if self._listener is None:
            self._listener = PeerListener(
                host=self.config.listen_host, port=0, token=self._token, shaper=self.config.shaper
            )
        self._register(rejoin=False, deadline=deadline)
        for target, name in ((self._session_loop, "session"), (self._worker_loop, "worker")):
            t = threading.Thread(target=target, name=f"lowcomm-{name}-{self.peer_id}", daemon=True)
            t.start()
            self._threads.append(t)
        while True:
            resp = self._request(
                {"op": "status", "peer_id": self.peer_id, "wait_s": self._poll(deadline)},
                deadline=deadline,
            )
            self._raise_for(resp, "connect()")
            if resp.get("accepted"):
                with self._lock:
                    self._accepted = True
                self._update_world(resp)
                logger.info(
                    "peer %s accepted: world %d, group %d size %d",
                    self.peer_id,
                    self.world_size,
                    self.peer_group,
                    self.peer_group_world_size,
                )
                return
            if time.monotonic() >= deadline:
                raise CommTimeoutError(
                    f"peer {self.peer_id} was not accepted within the timeout: the running peers "
                    "have not called update_topology() (or there are none and the master did "
                    "not admit this peer)"
                )

    def close(self, timeout_s: float = 5.0) -> None:
        """Leaves the run (the master removes this peer at once) and closes every connection."""
        if self._closed.is_set():
            return
        if self._session is not None and self._evicted is None:
            with contextlib.suppress(CommError, OSError):
                self._request(
                    {"op": "leave", "peer_id": self.peer_id},
                    deadline=time.monotonic() + timeout_s,
                    retry=False,
                )
        self._closed.set()
        with self._tasks_cond:
            pending, self._tasks = self._tasks, []
            self._tasks_cond.notify_all()
        for task in pending:
            task.future.set_exception(TopologyError("the communicator was closed"))
        for conn in (*self._ctls.values(), self._session):
            if conn is not None:
                conn.close()
        self._drop_ring()
        if self._listener is not None:
            self._listener.close()
        if self._p2p_pool is not None:
            self._p2p_pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            kept, self._p2p_conns = list(self._p2p_conns.values()), {}
        for conn in kept:
            conn.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=timeout_s)

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ phases
    def are_peers_pending(self, timeout_s: float | None = None) -> bool:
        """True if peers wait to be admitted. Every accepted peer must call it (a phase); all get
        the same answer, so all take the same branch."""
        resp = self._submit(
            lambda d: self._gate("pending", "", {}, d), timeout_s, "are_peers_pending()"
        ).wait()
        return bool(resp["pending"])

    def update_topology(self, timeout_s: float | None = None) -> None:
        """Admits pending peers. Every accepted peer must call it; returns once all have."""
        self._submit(
            lambda d: self._gate("topology", "", {}, d), timeout_s, "update_topology()"
        ).wait()

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        out: torch.Tensor | None = None,
        quantization: str | Codec | None = None,
        tag: int = 0,
        timeout_s: float | None = None,
    ) -> AllReduceInfo:
        """All-reduces ``tensor`` over the accepted peers of this peer group, in place or into
        ``out``. Every peer of the group must call it with the same op, size, dtype, codec, tag.

        Blocks until committed everywhere. On failure raises ``PeerFailureError`` (a peer died)
        or ``CommTimeoutError`` (a peer stalled), with ``tensor``/``out`` untouched on every peer;
        call it again (or use ``all_reduce_with_retry``) to reduce among the survivors.
        """
        result: AllReduceInfo = self.all_reduce_async(
            tensor, op, out=out, quantization=quantization, tag=tag, timeout_s=timeout_s
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
    ) -> Handle:
        """Like ``all_reduce`` but returns a ``Handle`` at once. Several may be in flight; they
        run one after the other in submission order on the worker thread, so every peer must
        submit them in the same order (tags tell them apart; mismatched tags raise). Do not
        touch ``tensor``/``out`` until ``handle.wait()`` returned."""
        check_all_reduce_args(tensor, op, out=out, tag=tag)
        codec = _resolve_codec(quantization)

        def run(deadline: float) -> AllReduceInfo:
            return self._run_all_reduce(tensor, op, out, codec, tag, deadline)

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
    ) -> AllReduceInfo:
        """``all_reduce`` that retries among the survivors after a peer failure or stall, at
        most ``max_attempts`` times in all (each attempt gets ``timeout_s``). A retry includes
        every peer still accepted: dead peers are evicted at once, stalled ones after the
        heartbeat timeout (the retry waits for that). Re-raises the last error."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        for attempt in range(1, max_attempts + 1):
            try:
                return self.all_reduce(
                    tensor, op, out=out, quantization=quantization, tag=tag, timeout_s=timeout_s
                )
            except (PeerFailureError, CommTimeoutError) as e:
                if attempt == max_attempts:
                    raise
                logger.warning(
                    "all_reduce attempt %d/%d failed (%s); retrying among the survivors",
                    attempt,
                    max_attempts,
                    e,
                )
        raise AssertionError("unreachable")

    def sync_shared_state(
        self,
        state: SharedState,
        strategy: str = "enforce_popular",
        *,
        timeout_s: float | None = None,
    ) -> SyncInfo:
        """Makes ``state`` bit-identical on every accepted peer of this group (see
        ``lowcomm.comm.shared_state``). Every peer of the group must call it."""
        from lowcomm.comm import shared_state

        shared_state.validate_strategy(strategy)

        def run(deadline: float) -> SyncInfo:
            return shared_state.sync(self, state, strategy, deadline)

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
        address = self._address_of(to)
        deadline = self._deadline(timeout_s)
        data = tensor.detach().to("cpu").contiguous()
        return Handle(
            self._p2p().submit(self._send_p2p, data, to, address, tag, deadline), f"send(to={to})"
        )

    def recv_async(
        self, out: torch.Tensor, *, from_: str, tag: int = 0, timeout_s: float | None = None
    ) -> Handle:
        self._address_of(from_)
        deadline = self._deadline(timeout_s)
        return Handle(
            self._p2p().submit(self._recv_p2p, out, from_, tag, deadline), f"recv(from_={from_})"
        )

    # ------------------------------------------------------------------ internals: plumbing
    def _deadline(self, timeout_s: float | None) -> float:
        t = self.config.timeout_s if timeout_s is None else float(timeout_s)
        if not t > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        return time.monotonic() + t

    def _poll(self, deadline: float) -> float:
        return max(0.0, min(self.config.poll_s, deadline - time.monotonic()))

    def _advertised(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.address
        return (self.config.advertise_host or host, int(port))

    def _check_usable(self) -> None:
        if self._evicted is not None:
            raise TopologyError(
                f"peer {self.peer_id} was evicted ({self._evicted}); create a new Communicator "
                "and connect() to rejoin"
            )
        if self._closed.is_set():
            raise TopologyError("the communicator is closed")
        if not self._accepted:
            raise TopologyError("not accepted into the run yet: call connect() first")

    def _raise_for(self, resp: dict[str, Any], what: str) -> None:
        err = resp.get("error")
        if err is None:
            return
        msg = f"{what}: {resp.get('message', err)}"
        if err == "evicted":
            self._evicted = str(resp.get("message", "evicted"))
        raise TopologyError(msg)

    def _update_world(self, resp: dict[str, Any]) -> None:
        if "world" not in resp:
            return
        with self._lock:
            self._world = list(resp["world"])
            self.revision = int(resp.get("revision", self.revision))
            for p in self._world:
                if p["peer_id"] == self.peer_id:
                    self._join_seq = int(p.get("join_seq", -1))

    def _address_of(self, peer_id: str) -> tuple[str, int]:
        self._check_usable()
        with self._lock:
            for p in self._world:
                if p["peer_id"] == peer_id:
                    return str(p["address"][0]), int(p["address"][1])
        raise TopologyError(
            f"peer {peer_id} is not in this peer's view of the world ({self.peers}); call "
            "update_topology() or check the id"
        )

    def _register(self, *, rejoin: bool, deadline: float) -> None:
        """Opens the session connection and registers (or re-registers after a master restart)."""
        conn, _hello = _handshake.connect(
            self.master_address,
            token=self._token,
            hello={"role": "session", "peer_id": self.peer_id},
            timeout_s=max(0.1, min(10.0, deadline - time.monotonic())),
            max_frame_bytes=MAX_CONTROL_FRAME_BYTES,
        )
        with self._lock:
            world = list(self._world)
        req = {
            "op": "register",
            "peer_id": self.peer_id,
            "peer_group": self.peer_group,
            "address": list(self._advertised()),
            "accepted": rejoin and self._accepted,
            "rejoin": rejoin,
            "revision": self.revision,
            "join_seq": self._join_seq,
            "world": world if rejoin else [],
        }
        try:
            conn.send_json(KIND_REQUEST, req, timeout_s=10.0)
            _kind, _tag, resp = conn.recv_json(timeout_s=10.0)
        except BaseException:
            conn.close()
            raise
        if resp.get("error"):
            conn.close()
            self._raise_for(resp, "registering with the master")
        self.heartbeat_timeout_s = float(resp["heartbeat_timeout_s"])
        self._config_blob = base64.b64decode(resp.get("config_blob", ""))
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
        interval = self.config.heartbeat_interval_s or self.heartbeat_timeout_s / 4
        while not self._closed.wait(interval):
            conn = self._session
            try:
                if conn is None or conn.closed:
                    self._register(rejoin=True, deadline=time.monotonic() + 5.0)
                    continue
                conn.send_json(
                    KIND_REQUEST, {"op": "heartbeat", "peer_id": self.peer_id}, timeout_s=5.0
                )
                _kind, _tag, resp = conn.recv_json(timeout_s=5.0)
                if resp.get("error") == "evicted":
                    self._evicted = str(resp.get("message"))
                    logger.error("peer %s: %s", self.peer_id, self._evicted)
                    conn.close()
                    return
                if resp.get("error") == "unknown_peer":
                    conn.close()
            except (CommError, OSError) as e:
                if self._closed.is_set():
                    return
                if isinstance(e, TopologyError) and self._evicted is not None:
                    return
                logger.info("peer %s: master session lost (%s); reconnecting", self.peer_id, e)
                if conn is not None:
                    conn.close()

    def _request(
        self, req: dict[str, Any], *, deadline: float, retry: bool = True, channel: str = "main"
    ) -> dict[str, Any]:
        """One request/response on the control connection, reconnecting (and waiting for the
        session to re-register after a master restart) until ``deadline``."""
        last: Exception | None = None
        while True:
            with self._ctl_locks[channel]:
                conn = self._ctls[channel]
                try:
                    if conn is None or conn.closed:
                        self._ctls[channel] = conn = None
                        conn, _ = _handshake.connect(
                            self.master_address,
                            token=self._token,
                            hello={"role": "control", "peer_id": self.peer_id},
                            timeout_s=max(0.1, min(5.0, deadline - time.monotonic())),
                            max_frame_bytes=MAX_CONTROL_FRAME_BYTES,
                        )
                        self._ctls[channel] = conn
                    conn.send_json(KIND_REQUEST, req, timeout_s=10.0)
                    kind, _tag, resp = conn.recv_json(
                        timeout_s=float(req.get("wait_s", 0.0)) + 10.0
                    )
                    if kind != KIND_RESPONSE or not isinstance(resp, dict):
                        raise ProtocolError(f"unexpected frame kind {kind} from the master")
                except (PeerFailureError, CommTimeoutError, ProtocolError, OSError) as e:
                    if conn is not None:
                        conn.close()
                    last = e
                    resp = None
            if resp is not None and resp.get("error") != "unknown_peer":
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

    def _gate(
        self, kind: str, key: str, payload: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        """Waits at a phase gate until every peer of its scope arrived; returns the master's
        answer. On timeout tells the master this peer left the gate."""
        rid = uuid.uuid4().hex
        req = {
            "op": "gate",
            "peer_id": self.peer_id,
            "kind": kind,
            "key": key,
            "payload": payload,
            "rid": rid,
        }
        try:
            while True:
                resp = self._request({**req, "wait_s": self._poll(deadline)}, deadline=deadline)
                if resp.get("status") == "open":
                    self._update_world(resp)
                    return resp
                self._raise_for(resp, _describe(kind, key))
                if time.monotonic() >= deadline:
                    raise CommTimeoutError(
                        f"{_describe(kind, key)} timed out waiting for peers "
                        f"{resp.get('waiting_for')}: they never reached this phase (stalled, or "
                        "busy in a long step); they are evicted if they stop heartbeating"
                    )
        except CommError:
            with contextlib.suppress(CommError, OSError):
                self._request(
                    {"op": "leave_gate", "peer_id": self.peer_id, "rid": rid},
                    deadline=time.monotonic() + 2.0,
                    retry=False,
                )
            raise

    # ------------------------------------------------------------------ internals: worker
    def _submit(self, fn: Callable[[float], T], timeout_s: float | None, what: str) -> Handle:
        self._check_usable()
        deadline = self._deadline(timeout_s)
        task = _Task(fn=lambda: fn(deadline))
        with self._tasks_cond:
            self._tasks.append(task)
            self._tasks_cond.notify_all()
        return Handle(task.future, what)

    def _worker_loop(self) -> None:
        while True:
            with self._tasks_cond:
                while not self._tasks and not self._closed.is_set():
                    self._tasks_cond.wait(0.5)
                if self._closed.is_set():
                    return
                task = self._tasks.pop(0)
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                self._check_usable()
                task.future.set_result(task.fn())
            except BaseException as e:
                task.future.set_exception(e)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
        """A 1-D CPU buffer of at least ``numel`` elements, kept for the next op. Worker thread
        only (the ops that use it run there one at a time)."""
        key = (name, dtype, pin)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, pin_memory=pin)
            self._buffers[key] = buf
        return buf[:numel]

    def _drop_ring(self) -> None:
        ring, self._ring, self._ring_id = self._ring, None, None
        if ring is not None:
            with contextlib.suppress(Exception):
                ring.close()

    def _ring_for(self, gate: dict[str, Any], deadline: float) -> Ring:
        from lowcomm.comm._ring_setup import connect_ring

        if self._ring is not None and self._ring_id == gate["ring_id"]:
            return self._ring
        self._drop_ring()
        assert self._listener is not None
        # Every participant left the same gate within a poll interval, so building the ring
        # takes connection set-up time only. A neighbour frozen meanwhile is evicted after the
        # heartbeat timeout; waiting much longer than that for it would only delay the retry.
        build_s = min(deadline - time.monotonic(), 2 * self.heartbeat_timeout_s + 5.0)
        self._ring = connect_ring(
            listener=self._listener,
            rank=int(gate["rank"]),
            addresses=[(str(h), int(p)) for h, p in gate["addresses"]],
            ring_id=str(gate["ring_id"]),
            token=self._token,
            num_connections=self.config.num_connections,
            timeout_s=max(0.1, build_s),
            shaper=self.config.shaper,
        )
        self._ring_id = str(gate["ring_id"])
        return self._ring

    def _watch_op(self, op_id: str, ring: Ring, done: threading.Event, deadline: float) -> None:
        """While a ring runs longer than a moment, asks the master whether the operation was
        already aborted (a participant evicted: dead, or silent past the heartbeat timeout) and
        then closes the ring, so a stalled peer costs the heartbeat timeout, not ``timeout_s``."""
        if done.wait(0.5):
            return
        while not done.is_set() and time.monotonic() < deadline:
            try:
                resp = self._request(
                    {
                        "op": "verdict",
                        "peer_id": self.peer_id,
                        "op_id": op_id,
                        "wait_s": self._poll(deadline),
                    },
                    deadline=deadline,
                    retry=False,
                    channel="watch",
                )
            except CommError:
                return
            if resp.get("verdict") == "abort" and not done.is_set():
                logger.warning("aborting the running all-reduce: %s", resp.get("reason", "aborted"))
                ring.close()
                return

    def _vote(self, op_id: str, ok: bool, deadline: float) -> dict[str, Any]:
        # A peer that finished its ring waits for the others' votes; a stalled participant is
        # evicted after the heartbeat timeout, which aborts the vote, so this wait is bounded.
        vote_deadline = max(deadline, time.monotonic() + self.heartbeat_timeout_s + 5.0)
        while True:
            resp = self._request(
                {
                    "op": "vote",
                    "peer_id": self.peer_id,
                    "op_id": op_id,
                    "ok": ok,
                    "wait_s": self._poll(vote_deadline),
                },
                deadline=vote_deadline,
            )
            if resp.get("verdict"):
                return resp
            if time.monotonic() >= vote_deadline:
                raise CommTimeoutError(
                    f"all_reduce commit vote timed out waiting for {resp.get('waiting_for')}"
                )

    def _run_all_reduce(
        self,
        tensor: torch.Tensor,
        op: str,
        out: torch.Tensor | None,
        codec: Codec | None,
        tag: int,
        deadline: float,
    ) -> AllReduceInfo:
        start = time.perf_counter()
        payload = {
            "op": op,
            "numel": tensor.numel(),
            "dtype": str(tensor.dtype),
            "codec": None if codec is None else type(codec).__name__,
        }
        gate = self._gate("all_reduce", str(tag), payload, deadline)
        participants = list(gate["participants"])
        # The ring works on 1-D contiguous CPU tensors; it writes into ``scratch``, which is
        # copied to the caller's tensor only after the commit vote.
        src = tensor.detach()
        host = src.reshape(-1) if (src.device.type == "cpu" and src.is_contiguous()) else None
        if host is None:
            pin = src.device.type == "cuda"
            host = self._buffer("host", src.numel(), src.dtype, pin=pin)
            host.copy_(src.reshape(-1), non_blocking=False)
        scratch = self._buffer("scratch", host.numel(), host.dtype, pin=False)
        error: CommError | None = None
        tx = rx = 0
        if len(participants) == 1:
            scratch.copy_(host)
        else:
            try:
                ring = self._ring_for(gate, deadline)
                done = threading.Event()
                watcher = threading.Thread(
                    target=self._watch_op,
                    args=(str(gate["op_id"]), ring, done, deadline),
                    name=f"lowcomm-watch-{self.peer_id}",
                    daemon=True,
                )
                watcher.start()
                try:
                    stats = ring.all_reduce(
                        host,
                        op=op,
                        codec=codec,
                        tag=tag,
                        timeout_s=max(0.01, deadline - time.monotonic()),
                        out=scratch,
                    )
                finally:
                    done.set()
                tx, rx = int(stats.tx_bytes), int(stats.rx_bytes)
            except CommError as e:
                error = e
                self._drop_ring()
                # A ring thread that outlived the failed op may still write into these.
                self._buffers.clear()
        verdict = self._vote(str(gate["op_id"]), error is None, deadline)
        if verdict["verdict"] != "commit":
            self._drop_ring()
            reason = str(verdict.get("reason", ""))
            what = f"all_reduce(tag={tag}) among {len(participants)} peers aborted"
            detail = f"{error} (master: {reason})" if error is not None else reason
            if isinstance(error, CommTimeoutError):
                raise CommTimeoutError(
                    f"{what}: {detail}; nothing was applied: retry (all_reduce_with_retry) once "
                    "the stalled peer is evicted"
                ) from error
            raise PeerFailureError(
                f"{what}: {detail}; nothing was applied on any peer: retry with the survivors "
                "(all_reduce_with_retry)"
            ) from error
        target = out if out is not None else tensor
        with torch.no_grad():
            target.copy_(scratch.view(target.shape))
        return AllReduceInfo(
            world_size=len(participants),
            tx_bytes=tx,
            rx_bytes=rx,
            seconds=time.perf_counter() - start,
        )

    # ------------------------------------------------------------------ internals: p2p
    def _p2p(self) -> concurrent.futures.ThreadPoolExecutor:
        self._check_usable()
        with self._lock:
            if self._p2p_pool is None:
                self._p2p_pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix=f"lowcomm-p2p-{self.peer_id}"
                )
            return self._p2p_pool

    @contextlib.contextmanager
    def _p2p_slot(
        self, key: tuple[str, str, int], deadline: float
    ) -> Iterator[list[_frames.Connection | None]]:
        """Holds ``key``'s lock and lends its kept connection (``slot[0]``, None if there is none).

        The body leaves the connection it used in ``slot[0]`` to keep it for the next message,
        or None once it closed it; an exception closes whatever is in the slot.
        """
        with self._lock:
            lock = self._p2p_locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise CommTimeoutError(f"{key[0]} p2p with {key[1]} (tag {key[2]}): still busy")
        try:
            with self._lock:
                slot: list[_frames.Connection | None] = [self._p2p_conns.pop(key, None)]
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
                    if not self._closed.is_set():
                        self._p2p_conns[key] = conn
                        conn = None
                        while len(self._p2p_conns) > _P2P_KEEP_MAX:
                            evicted.append(self._p2p_conns.pop(next(iter(self._p2p_conns))))
            for old in (conn, *evicted):
                if old is not None:
                    old.close()
        finally:
            lock.release()

    def _send_p2p(
        self, data: torch.Tensor, to: str, address: tuple[str, int], tag: int, deadline: float
    ) -> None:
        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise CommTimeoutError(f"send to peer {to} timed out")
            return t

        with self._p2p_slot(("out", to, tag), deadline) as slot:
            conn = slot[0]
            if conn is not None and _readable(conn, 0.0):
                # An idle connection has nothing to read: this is EOF (the receiver dropped it).
                conn.close()
                slot[0] = conn = None
            if conn is None:
                conn, _ = _handshake.connect(
                    address,
                    token=self._token,
                    hello={
                        "purpose": "p2p",
                        "key": f"{self.peer_id}>{to}#{tag}",
                        "peer_id": self.peer_id,
                    },
                    timeout_s=left(),
                    shaper=self.config.shaper,
                )
                slot[0] = conn
            header = {"dtype": str(data.dtype), "shape": list(data.shape)}
            conn.send_json(_KIND_P2P_HEADER, header, tag=tag, timeout_s=left())
            raw = byte_view(data)
            for start in range(0, max(1, raw.nbytes), _P2P_FRAME_BYTES):
                conn.send_frame(
                    _KIND_P2P_DATA, raw[start : start + _P2P_FRAME_BYTES], tag=tag, timeout_s=left()
                )
            kind, _tag, ack = conn.recv_json(timeout_s=left())
            if kind != _KIND_P2P_ACK or not ack.get("ok"):
                raise PeerFailureError(f"peer {to} refused the tensor: {ack.get('message')}")

    def _recv_p2p(self, out: torch.Tensor, from_: str, tag: int, deadline: float) -> torch.Tensor:
        assert self._listener is not None
        listener = self._listener
        hello_key = f"{from_}>{self.peer_id}#{tag}"

        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise CommTimeoutError(f"recv from peer {from_} timed out")
            return t

        with self._p2p_slot(("in", from_, tag), deadline) as slot:
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
                    kind, _tag, header = conns[0][0].recv_json(timeout_s=left())
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
                        if self._closed.is_set():
                            kept.close()
                        else:
                            self._p2p_conns.setdefault(("in", from_, tag), kept)
                    slot[0] = None
                    raise
                if not ready:
                    continue
                try:
                    kind, _tag, header = kept.recv_json(timeout_s=left())
                except (CommError, OSError) as exc:  # EOF: the sender dropped it; wait for a new
                    logger.debug("kept p2p connection from %s ended: %s", from_, exc)
                    kept.close()
                    slot[0] = None
            conn = slot[0]
            assert conn is not None
            if kind != _KIND_P2P_HEADER:
                raise ProtocolError(f"expected a p2p header from {from_}, got kind {kind}")
            if header.get("dtype") != str(out.dtype) or list(header.get("shape", [])) != list(
                out.shape
            ):
                msg = f"receiver expects {out.dtype}{list(out.shape)}, sender sent {header}"
                with contextlib.suppress(CommError):
                    conn.send_json(_KIND_P2P_ACK, {"ok": False, "message": msg}, timeout_s=left())
                raise ValueError(f"recv(from_={from_}): {msg}")
            staging = torch.empty(out.numel(), dtype=out.dtype)
            raw = byte_view(staging)
            got = 0
            while got < raw.nbytes or (raw.nbytes == 0 and got == 0):
                fh = conn.recv_header(timeout_s=left())
                if fh.kind != _KIND_P2P_DATA or got + fh.length > raw.nbytes:
                    raise ProtocolError(f"unexpected p2p frame from {from_} (kind {fh.kind})")
                conn.recv_into(raw[got : got + fh.length], timeout_s=left())
                got += fh.length
                if raw.nbytes == 0:
                    break
            with torch.no_grad():
                out.copy_(staging.view(out.shape))
            conn.send_json(_KIND_P2P_ACK, {"ok": True}, timeout_s=left())
            return out


def _readable(conn: _frames.Connection, timeout_s: float) -> bool:
    """Whether ``conn`` has bytes (or EOF) to read within ``timeout_s``."""
    try:
        ready, _, _ = select.select([conn.fileno()], [], [], timeout_s)
    except (OSError, ValueError):  # closed under us: reading will report it
        return True
    return bool(ready)


def _describe(kind: str, key: str) -> str:
    return {
        "topology": "update_topology()",
        "pending": "are_peers_pending()",
        "all_reduce": f"all_reduce(tag={key})",
        "sync": "sync_shared_state()",
    }.get(kind, kind)


def _resolve_codec(quantization: str | Codec | None) -> Codec | None:
    if quantization is None:
        return None
    if isinstance(quantization, str):
        from lowcomm.compression import get_codec

        return get_codec(quantization)
    return quantization
