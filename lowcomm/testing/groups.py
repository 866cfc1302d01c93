"""Communicators that run in one process: a world of one, and several peers simulated by threads.

``SoloCommunicator`` is a world of one (every all-reduce is the identity); it is what a single
replica with nobody to talk to does, and what the exactness tests use. ``LocalGroup(n)`` simulates
``n`` peers inside one process, one thread per peer: all-reduces really average the peers' tensors
(pairwise, in rank order, so a power-of-two group of identical tensors averages exactly) and, with a
codec, every contribution and the result pass through that codec as on the wire. It runs the same
outer-loop code as real peers, so the convergence benchmark can compare methods without a network.
Neither is a network: membership never changes, and the only failure is a timeout while waiting
for the other peers, raised as ``CommTimeoutError`` (a ``LowcommError`` and a ``TimeoutError``),
as the real communicator raises it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from lowcomm.comm import check_all_reduce_args
from lowcomm.comm.errors import CommTimeoutError
from lowcomm.compression import resolve_codec

__all__ = ["LocalGroup", "LocalInfo", "SoloCommunicator"]


@dataclass(frozen=True)
class LocalInfo:
    """What an in-process all-reduce reports: participants and the bytes a ring would have sent."""

    world_size: int
    tx_bytes: int
    rx_bytes: int
    seconds: float = 0.0


class _Done:
    def __init__(self, info: Any) -> None:
        self._info = info

    def wait(self, *, timeout_s: float | None = None) -> Any:
        return self._info


class _SyncInfo:
    def __init__(self, revision: int) -> None:
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.revision = revision
        self.received: list[str] = []  # names copied from another peer (as SyncInfo's)


class SoloCommunicator:
    """A world of one peer: all-reduces return the tensor unchanged, nobody is ever pending.

    Thread-safe (it holds no state). Use it to run the outer loop on a single replica, or in tests.
    """

    world_size = 1
    rank = 0

    def all_reduce_async(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        quantization: Any = None,
        tag: int = 0,
        timeout_s: float = 60.0,
        stamp: dict[str, int] | None = None,  # accepted, not compared (no master here)
        check_finite: bool = False,
    ) -> _Done:
        check_all_reduce_args(tensor, op, tag=tag)
        return _Done(LocalInfo(world_size=1, tx_bytes=0, rx_bytes=0))

    def sync_shared_state(
        self, state: Any, strategy: str = "enforce_popular", *, timeout_s: float = 60.0
    ) -> Any:
        return _SyncInfo(int(getattr(state, "revision", 0)))

    def are_peers_pending(self, *, timeout_s: float = 10.0) -> bool:
        return False

    def update_topology(self, *, timeout_s: float = 60.0) -> None:
        return None


class _Round:
    def __init__(self, size: int) -> None:
        self.inputs: list[torch.Tensor | None] = [None] * size
        self.result: torch.Tensor | None = None
        self.collected = 0


class LocalGroup:
    """``n`` peers simulated in one process; ``communicator(rank)`` is peer ``rank``'s communicator.

    Each peer must run in its own thread (a synchronous all-reduce waits for all ``n``). The k-th
    all-reduce of every peer is one collective; peers must issue them in the same order with the
    same op and quantization, as real peers do.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"LocalGroup needs n >= 1 peers, got {n}")
        self.n = n
        self._cond = threading.Condition()
        self._rounds: dict[int, _Round] = {}
        self._seq = [0] * n
        self._shared: list[Any] = [None] * n
        self._shared_seq = [0] * n
        self._shared_done: dict[int, int] = {}

    def communicator(self, rank: int) -> _LocalPeer:
        if not 0 <= rank < self.n:
            raise ValueError(f"rank {rank} is outside the group of {self.n}")
        return _LocalPeer(self, rank)

    def _submit(self, rank: int, tensor: torch.Tensor, op: str, codec: Any) -> tuple[int, int]:
        with self._cond:
            seq = self._seq[rank]
            self._seq[rank] += 1
            rnd = self._rounds.setdefault(seq, _Round(self.n))
            # What travels: the codec's reconstruction of this peer's contribution, in fp32.
            contribution = tensor.detach().to(torch.float32, copy=True)
            if codec is not None:
                encoded = codec.encode(contribution)
                tx = int(encoded.nbytes)
                contribution = codec.decode(encoded).to(torch.float32)
            else:
                tx = contribution.numel() * contribution.element_size()
            rnd.inputs[rank] = contribution
            rnd.collected += 1
            if rnd.collected == self.n:
                rnd.result = self._reduce([t for t in rnd.inputs if t is not None], op, codec)
                rnd.inputs = [None] * self.n
                self._cond.notify_all()
            return seq, tx

    @staticmethod
    def _reduce(inputs: list[torch.Tensor], op: str, codec: Any) -> torch.Tensor:
        if op in ("min", "max"):
            out = inputs[0].clone()
            for t in inputs[1:]:
                out = torch.minimum(out, t) if op == "min" else torch.maximum(out, t)
            return out
        level = inputs
        while len(level) > 1:  # pairwise, so 2^k identical tensors sum exactly
            nxt = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        out = level[0]
        if op == "avg":
            out = out / len(inputs)
        if codec is not None:
            # The ring's all-gather sends the final quantized chunks: everyone gets the same copy.
            out = codec.decode(codec.encode(out)).to(torch.float32)
        return out

    def _wait(self, seq: int, rank: int, tensor: torch.Tensor, timeout_s: float | None) -> None:
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._rounds[seq].result is not None, timeout=timeout_s
            ):
                raise CommTimeoutError(
                    f"peer {rank}: local all-reduce #{seq} timed out after {timeout_s} s; another "
                    "peer's thread stopped or issues its all-reduces in a different order"
                )
            rnd = self._rounds[seq]
            assert rnd.result is not None
            tensor.copy_(rnd.result)
            rnd.collected -= 1
            if rnd.collected == 0:
                del self._rounds[seq]

    def _sync_state(self, rank: int, state: Any, timeout_s: float) -> tuple[int, list[str]]:
        # Peer 0's state wins (as the most popular hash would among identical replicas).
        with self._cond:
            seq = self._shared_seq[rank]
            self._shared_seq[rank] += 1
            self._shared[rank] = state
            self._shared_done[seq] = self._shared_done.get(seq, 0) + 1
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._shared_done[seq] >= self.n, timeout=timeout_s):
                raise CommTimeoutError(
                    f"peer {rank}: local shared-state sync #{seq} timed out after {timeout_s} s; "
                    "another peer's thread stopped before its sync"
                )
            source = self._shared[0]
        rx = 0
        received: list[str] = []
        if rank != 0:
            for name, t in state.tensors.items():
                src = source.tensors[name]
                if not torch.equal(t, src):
                    t.copy_(src)
                    rx += t.numel() * t.element_size()
                    received.append(name)
            state.revision = source.revision
        with self._cond:
            self._shared_done[seq] += 1
            self._cond.notify_all()
            # Everyone has copied before anyone mutates its state again.
            self._cond.wait_for(lambda: self._shared_done[seq] >= 2 * self.n, timeout=timeout_s)
        return rx, received


class _Handle:
    def __init__(
        self, group: LocalGroup, seq: int, rank: int, tensor: torch.Tensor, tx: int
    ) -> None:
        self._group, self._seq, self._rank, self._tensor, self._tx = group, seq, rank, tensor, tx
        self._info: LocalInfo | None = None

    def wait(self, *, timeout_s: float | None = None) -> LocalInfo:
        if self._info is None:
            self._group._wait(self._seq, self._rank, self._tensor, timeout_s)
            n = self._group.n
            # A ring all-reduce sends and receives 2(n-1)/n of the (encoded) tensor per peer.
            tx = 2 * (n - 1) * self._tx // n
            self._info = LocalInfo(world_size=n, tx_bytes=tx, rx_bytes=tx)
        return self._info


class _LocalPeer:
    def __init__(self, group: LocalGroup, rank: int) -> None:
        self._group = group
        self.rank = rank

    @property
    def world_size(self) -> int:
        return self._group.n

    def all_reduce_async(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        quantization: Any = None,
        tag: int = 0,
        timeout_s: float = 60.0,
        stamp: dict[str, int] | None = None,  # accepted, not compared (no master here)
        check_finite: bool = False,
    ) -> _Handle:
        check_all_reduce_args(tensor, op, tag=tag)
        codec = resolve_codec(quantization)
        seq, tx = self._group._submit(self.rank, tensor, op, codec)
        return _Handle(self._group, seq, self.rank, tensor, tx)

    def sync_shared_state(
        self, state: Any, strategy: str = "enforce_popular", *, timeout_s: float = 60.0
    ) -> Any:
        rx, received = self._group._sync_state(self.rank, state, timeout_s)
        info = _SyncInfo(int(state.revision))
        info.rx_bytes = rx
        info.received = received
        return info

    def are_peers_pending(self, *, timeout_s: float = 10.0) -> bool:
        return False

    def update_topology(self, *, timeout_s: float = 60.0) -> None:
        return None
