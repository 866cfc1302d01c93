"""Shared state: named tensors plus a revision, kept bit-identical on every peer of a group.

``sync_shared_state`` (on ``Communicator``) runs this protocol:

1. Every peer hashes each tensor (BLAKE2b over dtype, shape and bytes) and sends the hashes, its
   revision and its strategy to the master (a phase gate of the peer group).
2. The master picks the state: that of the ``send_only`` peers if any (they must agree), else the
   most popular ``(revision, state hash)`` among the ``enforce_popular`` peers (ties: the higher
   revision). ``receive_only`` peers never vote.
3. Each outdated peer fetches *only the tensors whose hash differs*, split into chunks that it
   pulls from every up-to-date peer at once (one connection per source, a shared work queue): a
   source that dies mid-transfer just stops taking chunks and its unfinished chunk goes back to
   the queue for the others. Received bytes land in staging buffers; they are hashed and copied
   into the caller's tensors only if every hash matches, so a failed sync changes nothing.
4. Up-to-date peers serve chunks until every participant reported done to the master.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lowcomm._tensors import byte_view
from lowcomm.comm import _frames, _handshake
from lowcomm.comm._control import ControlClient
from lowcomm.comm._protocol import KIND_STATE_DATA, KIND_STATE_REQUEST, GateKind
from lowcomm.comm.errors import CommError, CommTimeoutError, PeerFailureError, TopologyError
from lowcomm.comm.listener import PeerListener
from lowcomm.comm.shaper import Shaper
from lowcomm.faults import FaultInjector

__all__ = ["STRATEGIES", "SharedState", "SyncInfo", "tensor_hash"]

logger = logging.getLogger(__name__)

STRATEGIES = ("enforce_popular", "receive_only", "send_only")
_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass
class SharedState:
    """Named tensors plus a revision; what ``sync_shared_state`` keeps identical across peers.

    The tensors are synced in place (the same tensor objects keep their storage); a name the
    peer lacks is added. Do not modify them while a sync runs.
    """

    tensors: dict[str, torch.Tensor]
    revision: int = 0

    def __post_init__(self) -> None:
        if self.revision < 0:
            raise ValueError(f"revision must be >= 0, got {self.revision}")
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise ValueError(f"SharedState maps str -> torch.Tensor, got {name!r}: {type(t)}")

    def hashes(self) -> dict[str, str]:
        """Hex digest of every tensor (see ``tensor_hash``)."""
        return {name: tensor_hash(t) for name, t in self.tensors.items()}

    def state_hash(self) -> str:
        """One digest over every name and tensor hash."""
        return _combine(self.hashes())


@dataclass(frozen=True, kw_only=True)
class SyncInfo:
    """What one sync did on this peer."""

    tx_bytes: int
    rx_bytes: int
    revision: int
    received: list[str] = field(default_factory=list)  # names fetched (empty if up to date)
    num_sources: int = 0  # distinct peers that served this peer's chunks


def tensor_hash(t: torch.Tensor) -> str:
    """BLAKE2b-128 over dtype, shape and the raw bytes of ``t`` (any device, any layout)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_host_bytes(t))
    return h.hexdigest()


def _host_bytes(t: torch.Tensor) -> memoryview:
    """``t``'s bytes, copied to contiguous CPU memory first where it is not already."""
    return byte_view(t.detach().to("cpu").contiguous())


def _combine(hashes: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(hashes):
        h.update(f"{name}={hashes[name]};".encode())
    return h.hexdigest()


def validate_strategy(strategy: str) -> None:
    """ValueError unless ``strategy`` is one of ``STRATEGIES``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise TopologyError(f"unknown dtype {name!r} in the shared state's description")
    return dtype


def sync(
    control: ControlClient,
    state: SharedState,
    strategy: str,
    deadline: float,
    *,
    listener: PeerListener,
    shaper: Shaper | None = None,
    faults: FaultInjector | None = None,
) -> SyncInfo:
    """Runs one sync (see the module docstring); the communicator calls it on its worker thread.

    ``control`` is the peer's master session, ``listener`` serves this peer's chunks when it is a
    source, ``shaper`` shapes its fetches, ``faults`` is hit at ``state.serve`` per served chunk.
    """
    hashes = state.hashes()
    meta = {n: [str(t.dtype), list(t.shape)] for n, t in state.tensors.items()}
    payload = {
        "strategy": strategy,
        "revision": state.revision,
        "state_hash": _combine(hashes),
        "hashes": hashes,
        "meta": meta,
    }
    plan = control.gate(GateKind.SYNC, "", payload, deadline)
    op_id = str(plan["op_id"])
    need: list[str] = list(plan["need"])
    tx = rx = 0
    received: list[str] = []
    num_sources = 0
    server: _Server | None = None
    ok = False
    try:
        if plan["is_source"] and len(plan["world"]) > 1:
            server = _Server(listener, state, op_id, faults=faults)
        if need:
            extra = set(state.tensors) - set(plan["hashes"])
            if extra:
                raise TopologyError(
                    f"this peer's shared state has tensors the others lack: {sorted(extra)}; "
                    "every peer must share the same names"
                )
            staging, rx, num_sources = _fetch(control, plan, need, deadline, shaper=shaper)
            for name, buf in staging.items():
                if tensor_hash(buf) != plan["hashes"][name]:
                    raise PeerFailureError(
                        f"tensor {name!r} failed hash verification after transfer; nothing was "
                        "applied: retry sync_shared_state()"
                    )
            with torch.no_grad():
                for name, buf in staging.items():
                    if name in state.tensors:
                        state.tensors[name].copy_(buf)
                    else:
                        state.tensors[name] = buf
            received = sorted(staging)
        elif strategy != "send_only" and _combine(hashes) != plan["state_hash"]:
            # Hashes agree per tensor but names differ (a tensor only we have).
            raise TopologyError("this peer's shared state names differ from the chosen state")
        state.revision = int(plan["state_revision"])
        ok = True
    finally:
        # ``server``, if any, keeps serving chunks on its own threads while this waits.
        done = control.sync_done(op_id, ok, deadline if ok else time.monotonic() + 5.0)
        if server is not None:
            tx = server.close()
    if done.get("verdict") != "done":
        raise CommTimeoutError(f"sync_shared_state(): the sync round did not finish: {done}")
    return SyncInfo(
        tx_bytes=tx,
        rx_bytes=rx,
        revision=state.revision,
        received=received,
        num_sources=num_sources,
    )


def _fetch(
    control: ControlClient,
    plan: dict[str, Any],
    need: list[str],
    deadline: float,
    *,
    shaper: Shaper | None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Pulls the needed tensors striped over every source; returns staging tensors."""
    sources = list(plan["sources"])
    if not sources:
        raise PeerFailureError("no up-to-date peer is left to fetch the shared state from; retry")
    staging: dict[str, torch.Tensor] = {}
    views: dict[str, memoryview] = {}
    work: queue.Queue[tuple[str, int, int]] = queue.Queue()
    for name in need:
        dtype_name, shape = plan["meta"][name]
        buf = torch.empty(tuple(shape), dtype=_dtype(dtype_name))
        staging[name] = buf
        views[name] = byte_view(buf)
        nbytes = views[name].nbytes
        for off in range(0, nbytes, _CHUNK_BYTES):
            work.put((name, off, min(_CHUNK_BYTES, nbytes - off)))
    remaining = [work.qsize()]
    lock = threading.Lock()
    rx = [0]
    used: set[str] = set()
    errors: list[str] = []

    def pull(source: dict[str, Any]) -> None:
        address = (str(source["address"][0]), int(source["address"][1]))
        try:
            conn, _ = _handshake.connect(
                address,
                token=control.token,
                encryption=control.encryption,
                hello={"purpose": "state", "key": plan["op_id"], "peer_id": control.peer_id},
                timeout_s=max(0.1, min(10.0, deadline - time.monotonic())),
                shaper=shaper,
            )
        except CommError as e:
            with lock:
                errors.append(f"{source['peer_id']}: {e}")
            return
        try:
            while True:
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    with lock:
                        if remaining[0] == 0:
                            break
                    time.sleep(0.01)  # chunks in flight elsewhere may come back to the queue
                    continue
                name, off, length = item
                try:
                    left = max(0.01, deadline - time.monotonic())
                    conn.send_json(
                        KIND_STATE_REQUEST,
                        {"name": name, "offset": off, "length": length},
                        timeout_s=left,
                    )
                    fh = conn.recv_header(timeout_s=left)
                    if fh.kind != KIND_STATE_DATA or fh.length != length:
                        raise PeerFailureError(f"bad state chunk from {source['peer_id']}")
                    conn.recv_into(views[name][off : off + length], timeout_s=left)
                except CommError as e:
                    work.put(item)  # another source takes it
                    with lock:
                        errors.append(f"{source['peer_id']}: {e}")
                    logger.warning(
                        "state source %s failed mid-transfer (%s); switching to the others",
                        source["peer_id"],
                        e,
                    )
                    return
                with lock:
                    remaining[0] -= 1
                    rx[0] += length
                    used.add(str(source["peer_id"]))
            with contextlib.suppress(CommError):
                conn.send_json(KIND_STATE_REQUEST, {"done": True}, timeout_s=2.0)
        finally:
            conn.close()

    threads = [
        threading.Thread(
            target=pull, args=(s,), name=f"lowcomm-state-pull-{s['peer_id']}", daemon=True
        )
        for s in sources
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
    if remaining[0] != 0:
        if time.monotonic() >= deadline:
            raise CommTimeoutError(
                f"shared-state transfer timed out with {remaining[0]} chunks missing; nothing was applied"
            )
        raise PeerFailureError(
            f"every shared-state source failed ({'; '.join(errors)}); nothing was applied: retry "
            "sync_shared_state() once the topology is updated"
        )
    return staging, rx[0], len(used)


class _Server:
    """Serves this peer's state chunks on its listener (purpose "state", key = sync round)."""

    def __init__(
        self,
        listener: PeerListener,
        state: SharedState,
        op_id: str,
        *,
        faults: FaultInjector | None,
    ) -> None:
        self._listener = listener
        self._faults = faults
        self._op_id = op_id
        self._views = {n: _host_bytes(t) for n, t in state.tensors.items()}
        self._stop = threading.Event()
        self._tx = 0
        self._served = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(
            target=self._accept_loop, daemon=True, name="lowcomm-state-serve"
        )
        self._acceptor.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._stop.is_set():
            try:
                conns = listener.wait_for("state", self._op_id, count=1, timeout_s=0.1)
            except CommTimeoutError:
                continue
            except CommError:
                return
            for conn, _hello in conns:
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                t.start()
                self._threads.append(t)

    def _serve(self, conn: _frames.Connection) -> None:
        try:
            while not self._stop.is_set():
                try:
                    _kind, _tag, req = conn.recv_json(timeout_s=10.0)
                except CommTimeoutError:
                    return  # the connection is closed after a timeout; the puller moves on
                if req.get("done"):
                    return
                name = str(req["name"])
                view = self._views[name]
                off, length = int(req["offset"]), int(req["length"])
                if not (off >= 0 and length >= 0 and off + length <= view.nbytes):
                    raise ValueError(f"chunk out of range: {req}")
                if self._faults is not None:
                    with self._lock:
                        chunk = self._served
                    self._faults.hit("state.serve", chunk=chunk, name=name)
                conn.send_frame(KIND_STATE_DATA, view[off : off + length], timeout_s=30.0)
                with self._lock:
                    self._tx += length
                    self._served += 1
        except (CommError, KeyError, ValueError, TypeError) as e:
            logger.info("state serving connection ended: %s", e)
        finally:
            conn.close()

    def close(self) -> int:
        """Stops serving; returns the bytes served."""
        self._stop.set()
        self._acceptor.join(timeout=2.0)
        for t in self._threads:
            t.join(timeout=2.0)
        return self._tx
