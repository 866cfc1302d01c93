"""One all-reduce of the TCP backend, all or nothing: the phase gate at the master, the ring
(cached between operations), the commit vote. ``Communicator`` owns one and runs it on its worker
thread.

The caller's tensor is written by the ring directly, not copied into after the verdict, and not
copied before the ring either: the ring saves each sub-chunk of what it overwrites into a reused
backup buffer just before writing it (``ring.Undo``; in place, while the reduce-scatter reads
the input anyway, so the save costs no extra pass over memory; quantized and half-precision ops
save all of it before they start). Any failure (the ring, the vote, an abort verdict) puts the
saved parts back, so the caller's tensor is unchanged unless the operation committed on every
participant. (CUDA and strided
tensors go through host buffers, copied back after the verdict.) ``quantization="auto"``:
``AutoQuantization``.

An op that runs longer than a moment is watched for the master's abort (a participant evicted)
from a thread kept for it (``_Watcher``), which looks at the running op periodically rather than
being handed every op: a 4 KiB op pays no thread hand-off for a watch it does not need.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from lowcomm.comm._control import ControlClient
from lowcomm.comm._ops import describe_codec, has_nonfinite
from lowcomm.comm._protocol import GateKind, OpReport, OpState
from lowcomm.comm._ring_setup import connect_ring
from lowcomm.comm.errors import CommError, CommTimeoutError, PeerFailureError
from lowcomm.comm.listener import PeerListener
from lowcomm.comm.ring import Ring, Undo
from lowcomm.compression import Codec

if TYPE_CHECKING:
    from lowcomm.comm.communicator import CommConfig

__all__ = ["AUTO_MIN_BYTES", "AllReduceInfo", "AutoQuantization", "VotedAllReduce"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AllReduceInfo:
    """What one committed all-reduce did: ``world_size`` is the number of participants;
    ``master_round_trips`` the requests this peer made to the master for it (gate, vote and any
    watcher polls; 0 on backends without a master protocol); ``codec`` the name of the codec the
    data travelled with (None: exact), which ``quantization="auto"`` chooses."""

    world_size: int
    tx_bytes: int
    rx_bytes: int
    seconds: float
    master_round_trips: int = 0
    codec: str | None = None


# From this size on, the gate request is sent from a helper thread while the worker stages the
# tensor (the backup copy); below it the copy is cheaper than the hand-off.
_STAGE_ASIDE_BYTES = 256 * 1024

# An op running this long is watched for the master's abort (``_Watcher``).
_WATCH_AFTER_S = 0.25

# "auto" quantizes only tensors at least this large: below it an op is latency-bound and the
# codec's passes cannot pay for themselves.
AUTO_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class AutoQuantization:
    """``quantization="auto"``: quantize with ``codec`` only where it is faster than fp32.

    Decided per ring (a fixed set of peers; a new one after every membership change or failure):
    the first op of at least ``AUTO_MIN_BYTES`` on a ring runs in fp32, the second with ``codec``,
    each timed; with the second op every peer's preference (the codec was faster here) is
    all-reduced with ``min`` on the same ring, so every peer takes the same decision, for every
    later op of the ring. Smaller ops always run in fp32. On a fast link (loopback, a datacenter
    network) the CPU-bound codec loses and is left off; on a WAN link it wins."""

    codec: Codec

    def describe(self) -> dict[str, Any]:
        return {"name": "auto", "codec": describe_codec(self.codec)}


@dataclass
class _AutoState:
    """What "auto" measured on one ring: seconds per value of fp32 and of the codec."""

    fp32_s: float | None = None
    codec_s: float | None = None
    quantize: bool | None = None


class VotedAllReduce:
    """Runs a communicator's all-reduces one at a time (worker thread only), reusing its ring
    and buffers between operations. On any failure the caller's tensor is untouched."""

    def __init__(
        self,
        control: ControlClient,
        listener: PeerListener,
        config: CommConfig,
        *,
        peer_id: str,
        peer_group: int,
    ) -> None:
        self._control = control
        self._listener = listener
        self._config = config
        self.peer_id = peer_id
        self.peer_group = peer_group
        self._ring: Ring | None = None
        self._ring_id: str | None = None
        # Reused between all-reduces (all run on the worker thread, one at a time): a fresh
        # buffer per op costs a page fault per 4 KiB on first touch (pinned: a slow allocation).
        self._buffers: dict[tuple[str, torch.dtype, bool], torch.Tensor] = {}
        # The gate request runs here while the worker thread stages the data; the watcher of a
        # running ring on its own thread (both kept between operations).
        self._auto: dict[str, _AutoState] = {}  # ring id -> what "auto" measured on that ring
        self._helper = _Helper(f"lowcomm-gate-{peer_id}")
        self._watcher = _Watcher(f"lowcomm-watch-{peer_id}", control)

    def buffer(self, name: str, numel: int, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
        """A 1-D CPU buffer of at least ``numel`` elements, kept for the next op. Worker thread
        only (the ops that use it run there one at a time)."""
        key = (name, dtype, pin)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, pin_memory=pin)
            self._buffers[key] = buf
        return buf[:numel]

    def close(self) -> None:
        """Drops the ring and ends the helper threads (after the communicator's worker ended)."""
        self.drop_ring()
        self._helper.close()
        self._watcher.close()

    def drop_ring(self) -> None:
        ring, self._ring, self._ring_id = self._ring, None, None
        if ring is not None:
            with contextlib.suppress(Exception):
                ring.close()

    def ring_for(self, gate: dict[str, Any], deadline: float, aborted: threading.Event) -> Ring:
        """The gate's ring (the cached one if its id matches), built on a helper thread so that
        the master's abort (``aborted``: a participant was evicted) ends the wait at once: a
        neighbour that died before connecting costs one master round trip, not the build bound.
        An abandoned build ends at its own timeout and closes what it made."""
        if self._ring is not None and self._ring_id == gate["ring_id"]:
            return self._ring
        self.drop_ring()
        # Every participant left the same gate within a poll interval, so building the ring
        # takes connection set-up time only. A neighbour frozen meanwhile is evicted after the
        # heartbeat timeout; waiting much longer than that for it would only delay the retry.
        build_s = min(deadline - time.monotonic(), 2 * self._control.heartbeat_timeout_s + 5.0)
        listener, control, config = self._listener, self._control, self._config
        built: list[Ring | BaseException] = []
        ready = threading.Event()
        lock = threading.Lock()

        def build() -> None:
            try:
                ring: Ring | BaseException = connect_ring(
                    listener=listener,
                    rank=int(gate["rank"]),
                    addresses=[(str(h), int(p)) for h, p in gate["addresses"]],
                    ring_id=str(gate["ring_id"]),
                    token=control.token,
                    num_connections=_num_connections(gate, config),
                    thread_per_connection=_thread_per_connection(gate, config),
                    timeout_s=max(0.1, build_s),
                    shaper=config.shaper,
                    faults=config.faults,
                    encryption=config.encryption,
                )
            except BaseException as e:
                ring = e
            with lock:
                built.append(ring)
                abandoned = aborted.is_set()
            ready.set()
            if abandoned and isinstance(ring, Ring):
                ring.close()

        threading.Thread(
            target=build, name=f"lowcomm-ring-setup-{self.peer_id}", daemon=True
        ).start()
        while not ready.wait(0.05):
            if aborted.is_set():
                with lock:
                    if not built:
                        raise PeerFailureError(
                            "the master aborted this all-reduce while its ring was being built "
                            "(a participant was evicted)"
                        )
        result = built[0]
        if isinstance(result, BaseException):
            raise result
        self._ring, self._ring_id = result, str(gate["ring_id"])
        return result

    def run(
        self,
        tensor: torch.Tensor,
        op: str,
        out: torch.Tensor | None,
        codec: Codec | AutoQuantization | None,
        tag: int,
        deadline: float,
        *,
        stamp: dict[str, int] | None = None,
        check_finite: bool = False,
    ) -> AllReduceInfo:
        start = time.perf_counter()
        trips0 = self._control.round_trips
        payload = {
            "op": op,
            "numel": tensor.numel(),
            "dtype": str(tensor.dtype),
            "codec": codec.describe()
            if isinstance(codec, AutoQuantization)
            else describe_codec(codec),
        }
        if stamp is not None:
            payload["stamp"] = stamp
        # The verdict travels through the gate: every peer learns it when the gate opens.
        # A quantized contribution must be finite (min-max codes cannot carry NaN/inf); "auto"
        # quantizes only ops of AUTO_MIN_BYTES or more, which every peer decides alike.
        quantizes = codec is not None and (
            not isinstance(codec, AutoQuantization)
            or tensor.numel() * tensor.element_size() >= AUTO_MIN_BYTES
        )
        nonfinite = (check_finite or quantizes) and has_nonfinite(tensor)

        def open_gate() -> dict[str, Any]:
            return self._control.gate(
                GateKind.ALL_REDUCE, str(tag), payload, deadline, nonfinite=nonfinite
            )

        target = out if out is not None else tensor
        stage_error: BaseException | None = None
        if tensor.numel() * tensor.element_size() < _STAGE_ASIDE_BYTES or _writes_in_place(
            tensor, target
        ):
            # Staging a small tensor, or one the ring writes directly (nothing to copy), costs
            # less than handing the request to another thread.
            gate = open_gate()
            try:
                plan = self._stage(tensor, target)
            except BaseException as exc:
                stage_error = exc
        else:
            # The gate request leaves first; this thread stages the data while it is answered.
            gate_call = self._helper.call(open_gate)
            try:
                plan = self._stage(tensor, target)
            except BaseException as exc:
                stage_error = exc
            finally:
                gate = gate_call.result()
        participants = list(gate["participants"])
        op_id = str(gate["op_id"])

        def report(state: OpState) -> None:
            self._control.report_op(
                OpReport(op_id=op_id, group=self.peer_group, participants=participants, state=state)
            )

        if stage_error is not None:
            # The gate is open: say so at once rather than let the others wait out the ring.
            with contextlib.suppress(BaseException):
                report(OpState.FAILED)
                self._control.vote(
                    op_id, False, deadline, group=self.peer_group, participants=participants
                )
            raise stage_error

        report(OpState.RUNNING)
        if self._config.faults is not None:
            self._config.faults.hit("comm.gate", tag=tag, op=op_id)
        error: BaseException | None = None
        tx = rx = 0
        used = codec if not isinstance(codec, AutoQuantization) else None
        if len(participants) == 1:
            if plan.dest.data_ptr() != plan.src.data_ptr():
                if plan.undo is not None:
                    plan.undo.save_all(plan.dest)
                plan.dest.copy_(plan.src)
        else:
            error, tx, rx, used = self._run_ring(gate, plan, op, codec, tag, deadline)
        if error is not None:
            plan.restore()
            # A ring thread that outlived the failed op may still write into these.
            self._buffers.clear()
        # Holding the finished result (or not) is recorded before the vote leaves: a master that
        # restarts after receiving it resolves the operation from these reports (``_rounds``).
        report(OpState.HOLDING if error is None else OpState.FAILED)
        try:
            verdict = self._control.vote(
                op_id, error is None, deadline, group=self.peer_group, participants=participants
            )
        except BaseException:
            if error is None:
                plan.restore()
            raise
        committed = verdict["verdict"] == "commit"
        if not committed:
            if error is None:
                plan.restore()
            report(OpState.ABORTED)
            self.drop_ring()
            if error is not None and not isinstance(error, CommError):
                raise error
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
        plan.apply(target)
        report(OpState.COMMITTED)
        return AllReduceInfo(
            world_size=len(participants),
            tx_bytes=tx,
            rx_bytes=rx,
            seconds=time.perf_counter() - start,
            master_round_trips=self._control.round_trips - trips0,
            codec=None if used is None else str(getattr(used, "name", type(used).__name__)),
        )

    def _stage(self, tensor: torch.Tensor, target: torch.Tensor) -> _Plan:
        """Where the ring reads and writes, and what a failure restores (see ``_Plan``)."""
        src = tensor.detach()
        dst = target.detach()
        on_host = src.device.type == "cpu" and src.is_contiguous()
        if not on_host:
            # A CUDA (or strided) tensor: the ring works on host copies; the result goes back to
            # the caller's tensor only after the verdict.
            pin = src.device.type == "cuda"
            host = self.buffer("host", src.numel(), src.dtype, pin=pin)
            host.copy_(src.reshape(-1))
            # Pinned too: the copy back to the device after the verdict is then a fast DMA.
            result = self.buffer("result", src.numel(), src.dtype, pin=pin)
            return _Plan(src=host, dest=result, undo=None, copy_back=True)
        flat = src.reshape(-1)
        if dst.device.type != "cpu" or not dst.is_contiguous():
            result = self.buffer("result", src.numel(), src.dtype, pin=False)
            return _Plan(src=flat, dest=result, undo=None, copy_back=True)
        dest = dst.reshape(-1)
        backup = self.buffer("backup", dest.numel(), dest.dtype, pin=False)
        in_place = dest.data_ptr() == flat.data_ptr()
        if not in_place and _overlaps(dest, flat):
            # A partial overlap: read a copy of the input, write a buffer, apply after the
            # verdict (the general, slower case).
            backup.copy_(flat)
            result = self.buffer("result", src.numel(), src.dtype, pin=False)
            return _Plan(src=backup, dest=result, undo=None, copy_back=True)
        # The ring writes the caller's tensor (or out=) directly, saving each part into the
        # backup buffer just before it overwrites it (``Undo``): what a failure puts back.
        # Nothing is copied before the ring, nor after the verdict.
        return _Plan(src=dest if in_place else flat, dest=dest, undo=Undo(backup), copy_back=False)

    def _run_ring(
        self,
        gate: dict[str, Any],
        plan: _Plan,
        op: str,
        codec: Codec | AutoQuantization | None,
        tag: int,
        deadline: float,
    ) -> tuple[BaseException | None, int, int, Codec | None]:
        """The ring part of an op, watched for the master's abort; (error or None, tx, rx, the
        codec it used)."""
        op_id = str(gate["op_id"])
        done = threading.Event()
        aborted = threading.Event()

        def on_abort() -> None:
            aborted.set()
            ring = self._ring
            if ring is not None and self._ring_id == gate["ring_id"]:
                ring.close()

        # Watched for the master's abort from the moment the gate opened: a participant that
        # dies before its ring connections are made must not hold the others in the build.
        self._watcher.watch(op_id, on_abort=on_abort, done=done, deadline=deadline)
        used = codec if not isinstance(codec, AutoQuantization) else None
        try:
            ring = self.ring_for(gate, deadline, aborted)
            if aborted.is_set():
                raise PeerFailureError("the master aborted this all-reduce")
            state: _AutoState | None = None
            if isinstance(codec, AutoQuantization) and plan.src.numel() * 4 >= AUTO_MIN_BYTES:
                state = self._auto_state(str(gate["ring_id"]))
                if state.quantize or (state.quantize is None and state.fp32_s is not None):
                    used = codec.codec
            t0 = time.perf_counter()
            stats = ring.all_reduce(
                plan.src,
                op=op,
                codec=used,
                tag=tag,
                timeout_s=max(0.01, deadline - time.monotonic()),
                out=plan.dest,
                undo=plan.undo,
            )
            if state is not None and state.quantize is None:
                self._calibrate(
                    ring, state, (time.perf_counter() - t0) / plan.src.numel(), tag, deadline
                )
            return None, int(stats.tx_bytes), int(stats.rx_bytes), used
        except BaseException as e:
            # Any failure, a CommError or not (a bug, an injected fault), fails the op on every
            # peer and leaves the caller's tensor as it was.
            self.drop_ring()
            return e, 0, 0, used
        finally:
            done.set()

    def _auto_state(self, ring_id: str) -> _AutoState:
        state = self._auto.get(ring_id)
        if state is None:
            if len(self._auto) >= 8:
                self._auto.pop(next(iter(self._auto)))
            state = self._auto[ring_id] = _AutoState()
        return state

    def _calibrate(
        self, ring: Ring, state: _AutoState, seconds_per_value: float, tag: int, deadline: float
    ) -> None:
        """Records an "auto" calibration op (see ``AutoQuantization``); after the second, agrees
        with the other peers on the decision (a one-value ``min`` all-reduce on the ring)."""
        if state.fp32_s is None:
            state.fp32_s = seconds_per_value
            return
        state.codec_s = seconds_per_value
        vote = torch.tensor([1.0 if state.codec_s < state.fp32_s else 0.0])
        ring.all_reduce(vote, "min", tag=tag, timeout_s=max(0.01, deadline - time.monotonic()))
        state.quantize = bool(vote.item() > 0.5)
        logger.info(
            "quantization='auto' on ring %s: fp32 %.3g ns/value, codec %.3g ns/value here; "
            "all peers: %s",
            ring.ring_id,
            state.fp32_s * 1e9,
            state.codec_s * 1e9,
            "quantize" if state.quantize else "exact fp32",
        )


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where one op's ring reads (``src``) and writes (``dest``), both flat host tensors.

    ``copy_back``: ``dest`` is a buffer, copied into the caller's tensor after the commit verdict
    (CUDA or strided tensors). Otherwise ``dest`` is the caller's own tensor (in place, ``src``
    is the same tensor) and ``undo`` holds the contents from before the op of every part the ring
    wrote: what any failure (ring, vote, abort verdict) puts back, so the caller's tensor is
    untouched unless the op committed everywhere."""

    src: torch.Tensor
    dest: torch.Tensor
    undo: Undo | None
    copy_back: bool

    def restore(self) -> None:
        if self.undo is not None:
            with torch.no_grad():
                self.undo.restore(self.dest)

    def apply(self, target: torch.Tensor) -> None:
        if self.copy_back:
            with torch.no_grad():
                target.copy_(self.dest.view(target.shape))


def _thread_per_connection(gate: dict[str, Any], config: CommConfig) -> bool:
    """The configured choice, or (None) False when both ring neighbours are loopback addresses
    (the ring is then CPU-bound: fewer threads move more), True otherwise."""
    if config.thread_per_connection is not None:
        return config.thread_per_connection
    return not _loopback_neighbours(gate)


def _num_connections(gate: dict[str, Any], config: CommConfig) -> int:
    """The configured number, or (None) 1 when every ring member's address is loopback, else 4.
    Both ends of a link must pick the same count, so the choice is made from the addresses every
    peer receives alike, never from one peer's own neighbours."""
    if config.num_connections is not None:
        return config.num_connections
    return 1 if all(_is_loopback(str(h)) for h, _ in gate["addresses"]) else 4


def _loopback_neighbours(gate: dict[str, Any]) -> bool:
    addresses = gate["addresses"]
    n, rank = len(addresses), int(gate["rank"])
    neighbours = {str(addresses[(rank + d) % n][0]) for d in (-1, 1)}
    return all(_is_loopback(h) for h in neighbours)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _writes_in_place(tensor: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``_stage`` has nothing to copy: the ring reads ``tensor`` and writes ``target``
    directly (host, contiguous, the same tensor or no overlap)."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in (tensor, target)) and (
        target.data_ptr() == tensor.data_ptr() or not _overlaps(target, tensor)
    )


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class _Watch(NamedTuple):
    op_id: str
    on_abort: Callable[[], None]
    done: threading.Event
    deadline: float
    started: float


class _Watcher:
    """Asks the master whether the running op was aborted (``ControlClient.watch_verdict``) once
    it has run ``_WATCH_AFTER_S``. Its thread looks at the op every ``_WATCH_AFTER_S`` instead of
    being handed each op: a wake-up per op (and another when it ended) cost a 4 KiB op a thread
    hand-off on a loaded host, for a watch that only ops running longer than that need. A watch
    so starts 1 to 2 periods into the op."""

    def __init__(self, name: str, control: ControlClient) -> None:
        self._name = name
        self._control = control
        self._current: _Watch | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(
        self, op_id: str, *, on_abort: Callable[[], None], done: threading.Event, deadline: float
    ) -> None:
        """Watches op ``op_id`` until ``done`` is set (worker thread; one op at a time)."""
        self._current = _Watch(op_id, on_abort, done, deadline, time.monotonic())
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._closed.set()

    def _loop(self) -> None:
        while not self._closed.wait(_WATCH_AFTER_S):
            w = self._current
            if w is None or w.done.is_set() or time.monotonic() - w.started < _WATCH_AFTER_S:
                continue
            try:
                self._control.watch_verdict(
                    w.op_id, on_abort=w.on_abort, done=w.done, deadline=w.deadline, grace_s=0.0
                )
            except Exception:  # the op still ends by its own deadline; the watcher lives on
                logger.exception("watching all-reduce %s for the master's abort failed", w.op_id)
            if self._current is w:
                self._current = None


class _Helper:
    """One daemon thread that runs calls one at a time, kept between operations (starting a
    thread per op costs more than the 4 KiB op's own round trip on a loaded host)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((fn, fut))
        return fut

    def close(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread = None

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
