"""One all-reduce of the TCP backend, all or nothing: the phase gate at the master, the ring
(cached between operations), the commit vote, and the copy into the caller's tensor only after
the verdict. ``Communicator`` owns one and runs it on its worker thread."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lowcomm.comm._control import ControlClient
from lowcomm.comm._ops import describe_codec, has_nonfinite
from lowcomm.comm._protocol import GateKind, OpReport, OpState
from lowcomm.comm._ring_setup import connect_ring
from lowcomm.comm.errors import CommError, CommTimeoutError, PeerFailureError
from lowcomm.comm.listener import PeerListener
from lowcomm.comm.ring import Ring
from lowcomm.compression import Codec

if TYPE_CHECKING:
    from lowcomm.comm.communicator import CommConfig

__all__ = ["AllReduceInfo", "VotedAllReduce"]


@dataclass(frozen=True, kw_only=True)
class AllReduceInfo:
    """What one committed all-reduce did: ``world_size`` is the number of participants."""

    world_size: int
    tx_bytes: int
    rx_bytes: int
    seconds: float


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

    def buffer(self, name: str, numel: int, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
        """A 1-D CPU buffer of at least ``numel`` elements, kept for the next op. Worker thread
        only (the ops that use it run there one at a time)."""
        key = (name, dtype, pin)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, pin_memory=pin)
            self._buffers[key] = buf
        return buf[:numel]

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
                    num_connections=config.num_connections,
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
        codec: Codec | None,
        tag: int,
        deadline: float,
        *,
        stamp: dict[str, int] | None = None,
        check_finite: bool = False,
    ) -> AllReduceInfo:
        start = time.perf_counter()
        payload = {
            "op": op,
            "numel": tensor.numel(),
            "dtype": str(tensor.dtype),
            "codec": describe_codec(codec),
        }
        if stamp is not None:
            payload["stamp"] = stamp
        # The verdict travels through the gate: every peer learns it when the gate opens.
        nonfinite = (check_finite or codec is not None) and has_nonfinite(tensor)
        gate = self._control.gate(
            GateKind.ALL_REDUCE, str(tag), payload, deadline, nonfinite=nonfinite
        )
        participants = list(gate["participants"])
        op_id = str(gate["op_id"])

        def report(state: OpState) -> None:
            self._control.report_op(
                OpReport(op_id=op_id, group=self.peer_group, participants=participants, state=state)
            )

        report(OpState.RUNNING)
        if self._config.faults is not None:
            self._config.faults.hit("comm.gate", tag=tag, op=op_id)
        # The ring works on 1-D contiguous CPU tensors; it writes into ``scratch``, which is
        # copied to the caller's tensor only after the commit vote.
        src = tensor.detach()
        host = src.reshape(-1) if (src.device.type == "cpu" and src.is_contiguous()) else None
        if host is None:
            pin = src.device.type == "cuda"
            host = self.buffer("host", src.numel(), src.dtype, pin=pin)
            host.copy_(src.reshape(-1), non_blocking=False)
        scratch = self.buffer("scratch", host.numel(), host.dtype, pin=False)
        error: CommError | None = None
        tx = rx = 0
        if len(participants) == 1:
            scratch.copy_(host)
        else:
            done = threading.Event()
            aborted = threading.Event()

            def on_abort() -> None:
                aborted.set()
                ring = self._ring
                if ring is not None and self._ring_id == gate["ring_id"]:
                    ring.close()

            # Watch for the master's abort from the moment the gate opened: a participant that
            # dies before its ring connections are made must not hold the others in the build.
            watcher = threading.Thread(
                target=self._control.watch_verdict,
                args=(op_id,),
                kwargs={"on_abort": on_abort, "done": done, "deadline": deadline},
                name=f"lowcomm-watch-{self.peer_id}",
                daemon=True,
            )
            watcher.start()
            try:
                ring = self.ring_for(gate, deadline, aborted)
                if aborted.is_set():
                    raise PeerFailureError("the master aborted this all-reduce")
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
                self.drop_ring()
                # A ring thread that outlived the failed op may still write into these.
                self._buffers.clear()
            finally:
                done.set()
        # Holding the finished result (or not) is recorded before the vote leaves: a master that
        # restarts after receiving it resolves the operation from these reports (``_rounds``).
        report(OpState.HOLDING if error is None else OpState.FAILED)
        verdict = self._control.vote(
            op_id, error is None, deadline, group=self.peer_group, participants=participants
        )
        committed = verdict["verdict"] == "commit"
        report(OpState.COMMITTED if committed else OpState.ABORTED)
        if not committed:
            self.drop_ring()
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
