"""Pipelined, striped, full-duplex ring all-reduce over authenticated TCP, with bounded failure.

Who calls what: every peer creates one ``PeerListener`` (it serves the ring and any other purpose
the control plane routes through it), then every member of a ring calls ``connect_ring`` with the
same ``addresses`` (ring order) and ``ring_id``, then the same sequence of ``Ring.all_reduce`` calls
(same sizes, ops, codecs and tags, in the same order).

The algorithm: the tensor is cut into ``world_size`` chunks and each chunk into sub-chunks of about
``subchunk_bytes``. Reduce-scatter then all-gather, as one pipeline: a receiving thread reads each
sub-chunk straight into its place in an fp32 working buffer (``recv_into``, no copy), reduces it with
the local values and queues it for the next hop at once, while sending threads drain those queues.
Sub-chunk ``m`` of the operation travels on connection ``m % num_connections``, so one operation
stripes over every connection to the right-hand neighbour; data flows right, so each peer sends and
receives at the same time (full duplex). In the all-gather phase every peer receives the bytes the
owner of each chunk produced, so results are bit-identical on every peer. fp16/bf16 tensors are
accumulated in fp32 (partial sums travel as fp32); the owner rounds each finished chunk to the
tensor's dtype once and the all-gather carries those 2-byte values.

Quantized (``codec=``): what travels is encoded, what is accumulated is fp32; the owner of each
reduced chunk encodes it once for the all-gather and replaces its own copy by the decoded value, and
the other peers forward those same bytes, so every peer ends bit-identical. A quantized sub-chunk
travels as the codec's raw parts followed by their crc32c (``_ring_wire.Layout``; no crc32c where
the ring's frames are sealed: the AEAD authenticates them; a zstd codec's output in its own
checksummed format instead): received into one reused buffer, checked, decoded
from views of it and forwarded from it, without copies. The calling thread encodes the first step's
sub-chunks in order while the ring threads already send, so the wire starts after one encode.
The pipeline itself is ``_ring_pipeline.RingPipeline``; the wire layout ``_ring_wire``.

A small op (one sub-chunk per chunk, frames of at most 16 KiB: a 4 KiB all-reduce) starts no
threads: the calling thread sends each step's frame and then receives the step's frame from the
left, in turn; the kernel takes such a frame whole without the neighbour reading it, so this
cannot deadlock, and the op pays no thread start or hand-off.

Receiving threads wake on a low-water mark (``_sockets.recv_exact``), not per TCP segment: on
loopback the wake-ups were a good part of the sending side's CPU. On a sealed ring a frame's 1 MiB
records are sealed and opened on a helper thread per connection direction while the ring's
threads move the neighbouring record through the socket (``_aead``, ``_cipher_thread``), so the
cipher overlaps the wire.

Failure: every socket operation runs against the operation's deadline. A dead neighbour raises
``PeerFailureError``, a stalled one ``CommTimeoutError``, peers in different operations
``ProtocolError`` - within ``timeout_s``. The first failure aborts all of the ring's sockets, so the
neighbours see the connection end and fail too, around the ring. The input tensor is read only;
the result is copied into it (or into ``out``) after every byte has arrived, so a failed operation
leaves it untouched. With ``undo=`` (the public call) the ring writes the destination directly
instead, saving each sub-chunk of it just before overwriting it (``_ring_buffers.Undo``); the
caller puts the saved parts back after a failure. A ring whose operation failed is closed; build a new one among the survivors.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from lowcomm.comm._frames import Connection
from lowcomm.comm._ops import check_all_reduce_args
from lowcomm.comm._ring_buffers import RingBuffers, Undo
from lowcomm.comm._ring_pipeline import RingLinks, RingPipeline, split
from lowcomm.comm.errors import CommError, CommTimeoutError, PeerFailureError
from lowcomm.compression import Codec, Encoded
from lowcomm.faults import FaultInjector

__all__ = ["DEFAULT_SUBCHUNK_BYTES", "Ring", "RingStats", "Undo"]

DEFAULT_SUBCHUNK_BYTES = 4 * 1024 * 1024

# A frame at most this large is taken whole by the kernel without the neighbour reading it (the
# smallest default TCP buffers hold more), so an op of such frames runs on the calling thread.
_INLINE_FRAME_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class RingStats:
    """What one ``all_reduce`` cost this peer: bytes on the wire (frame headers included) and
    wall-clock seconds."""

    tx_bytes: int
    rx_bytes: int
    seconds: float


class Ring:
    """This peer's connections to its ring neighbours; runs all-reduces over them.

    Made by ``connect_ring``. Operations on one ring run one at a time (a lock serialises
    concurrent callers, in arrival order). Closed after a failed operation.

    Fault injection: with ``faults`` given, a sending thread hits its ``ring.send`` point (context
    ``step``, ``sub``; steps 0..n-2 are the reduce-scatter, then the all-gather) before each
    sub-chunk leaves; a ``corrupt=True`` rule there sends the sub-chunk with one byte flipped.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        ring_id: str,
        send: list[Connection],
        recv: list[Connection],
        subchunk_bytes: int = DEFAULT_SUBCHUNK_BYTES,
        thread_per_connection: bool = True,
        faults: FaultInjector | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.ring_id = ring_id
        self.num_connections = len(send)
        self.subchunk_bytes = subchunk_bytes
        self._send = send
        self._recv = recv
        self._lock = threading.Lock()
        self._closed = False
        # Reused between operations: working buffers, sub-chunk layouts, the receive buffer.
        self._buffers = RingBuffers()
        self.faults = faults
        self.thread_per_connection = thread_per_connection

    def __repr__(self) -> str:
        return (
            f"Ring(ring_id={self.ring_id!r}, rank={self.rank}, world_size={self.world_size}, "
            f"num_connections={self.num_connections}, closed={self._closed})"
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Closes every connection of the ring. Idempotent; does not wait for a running op."""
        self._closed = True
        for conn in self._send + self._recv:
            conn.close()

    def _abort(self) -> None:
        self._closed = True
        for conn in self._send + self._recv:
            conn.abort()

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: str = "sum",
        *,
        codec: Codec | None = None,
        tag: int = 0,
        timeout_s: float = 30.0,
        out: torch.Tensor | None = None,
        undo: Undo | None = None,
    ) -> RingStats:
        """Reduces ``tensor`` across the ring; the result lands in ``out`` (or in ``tensor``).

        Every member calls it with a tensor of the same size and dtype, the same ``op``, codec and
        ``tag``. Blocks until done, at most ``timeout_s`` (plus a little to unwind).

        Args:
            tensor: contiguous CPU fp32, fp16 or bf16 tensor, any shape. Read only during the op.
            op: "sum", "avg", "min" or "max"; accumulation is fp32 whatever the dtype.
            codec: a ``lowcomm.compression`` codec; ``None`` sends exact fp32.
            tag: told apart consecutive or concurrent operations; a mismatch is a ProtocolError.
            timeout_s: bound on the whole operation.
            out: optional destination (same shape and dtype; may be ``tensor``).
            undo: write the result into ``out`` (or ``tensor``) directly, saving what it
                overwrites into ``undo`` first (``Undo``: a flat buffer of the tensor's size);
                after a failure ``undo.restore(dest)`` puts it back. An exact fp32 op saves each
                sub-chunk as it goes (in place: while the reduce-scatter reads it anyway), any
                other op all of the destination before it starts.

        Returns:
            RingStats of this peer.

        Raises:
            PeerFailureError: a neighbour died or aborted; retry with the survivors.
            CommTimeoutError: a neighbour stopped responding within ``timeout_s``.
            ProtocolError: the peers are not running the same operation.
            After any of these ``tensor`` is unchanged and the ring is closed (``out``, if a
            separate tensor, may hold partial values), except with ``undo``: then ``tensor``
            (in place) or ``out`` holds partial values until ``undo.restore``.
            KeyboardInterrupt: the calling thread was interrupted (Ctrl-C on the main thread);
                raised once every ring thread has ended, with the ring aborted, as after a
                failure above.
        """
        _check_args(tensor, op, out, timeout_s)
        dest = tensor if out is None else out
        if not self._lock.acquire(timeout=timeout_s):
            raise CommTimeoutError(
                f"ring {self.ring_id!r}: an earlier all-reduce held the ring for {timeout_s:.3g} s"
            )
        try:
            if self._closed:
                raise PeerFailureError(
                    f"ring {self.ring_id!r} is closed (an earlier operation failed or close() was "
                    "called): build a new ring among the surviving peers"
                )
            start = time.monotonic()
            if self.world_size == 1:
                if dest is not tensor:
                    if undo is not None:
                        undo.save_all(dest)
                    dest.copy_(tensor)
                return RingStats(0, 0, time.monotonic() - start)
            flat = tensor.view(-1)
            dest_flat = dest.view(-1)
            separate = dest is not tensor
            if undo is not None and not (
                codec is None
                and flat.dtype == torch.float32
                and (not separate or not _overlaps(dest_flat, flat))
            ):
                # Saved at once; an in-place op then reads its input from the saved copy.
                undo.save_all(dest_flat)
                if not separate:
                    flat, separate = undo.buffer.view(-1), True
                undo = None
            # Reduce straight into `out` when it is a separate fp32 tensor (or, with undo, into
            # the tensor itself); otherwise into a scratch buffer that is copied out at the end
            # (the input must survive a failure).
            if undo is not None or (
                separate and dest.dtype == torch.float32 and not _overlaps(dest_flat, flat)
            ):
                res = dest_flat
            else:
                res = self._buffers.scratch(flat.numel())
            stage = res
            if flat.dtype != torch.float32 and codec is None:
                # Only the chunk this peer sends first is read from `res` before it is written.
                lo, hi = split(flat.numel(), self.world_size, self.rank)
                res[lo:hi].copy_(flat[lo:hi])
                if separate and not _overlaps(dest_flat, flat):
                    stage = dest_flat
                else:
                    stage = self._buffers.stage(flat.numel(), flat.dtype)
            tx0, rx0 = self._bytes()
            pipeline = RingPipeline(
                self._links(),
                src=flat,
                res=res,
                stage=stage,
                op=op,
                codec=codec,
                tag=tag,
                deadline=start + timeout_s,
                undo=undo,
            )
            if _runs_inline(pipeline):
                _run_inline(pipeline)
            else:
                pipeline.run()
            if pipeline.error is not None:
                raise _with_context(pipeline.error, self, tag)
            if stage.data_ptr() != dest_flat.data_ptr():
                dest_flat.copy_(stage)
            tx1, rx1 = self._bytes()
            return RingStats(tx1 - tx0, rx1 - rx0, time.monotonic() - start)
        finally:
            self._lock.release()

    def _links(self) -> RingLinks:
        return RingLinks(
            rank=self.rank,
            world_size=self.world_size,
            send=self._send,
            recv=self._recv,
            protected=all(c.protected for c in self._send + self._recv),
            subchunk_bytes=self.subchunk_bytes,
            thread_per_connection=self.thread_per_connection,
            buffers=self._buffers,
            abort=self._abort,
            faults=self.faults,
        )

    def _bytes(self) -> tuple[int, int]:
        conns = self._send + self._recv
        return sum(c.tx_bytes for c in conns), sum(c.rx_bytes for c in conns)


def _runs_inline(pipeline: RingPipeline) -> bool:
    """A small op: one sub-chunk per chunk, each frame at most ``_INLINE_FRAME_BYTES``."""
    return pipeline.k == 1 and -(-pipeline.numel // pipeline.n) * 4 <= _INLINE_FRAME_BYTES


def _run_inline(pipeline: RingPipeline) -> None:
    """A small op on the calling thread alone: each step's frame is sent, then the step's frame
    from the left received and reduced, in turn. No send waits for the neighbour (every frame fits
    the socket buffers), so the ring cannot deadlock; the two thread starts and a queue hand-off
    per step of ``RingPipeline.run`` were most of a 4 KiB op's ring time on a loaded host."""
    deferred: list[tuple[Encoded, torch.Tensor]] = []
    try:
        pipeline.produce_first_step()
        for m in range(pipeline.num_messages):
            item = pipeline.queues[m % pipeline.num_connections % pipeline.num_threads].get_nowait()
            assert item is not None
            pipeline.send_message(m, item)
            pipeline.receive_message(m, deferred)
        while deferred:
            pipeline.decode_into(*deferred.pop())
    except BaseException as exc:
        pipeline.fail(exc)


def _check_args(tensor: torch.Tensor, op: str, out: torch.Tensor | None, timeout_s: float) -> None:
    """The all-reduce check every backend runs, plus what the ring needs: CPU tensors it can
    view as bytes, and a positive timeout."""
    check_all_reduce_args(tensor, op, out=out)
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor must be a contiguous CPU tensor (stage CUDA tensors first)")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if out is not None and (out.device.type != "cpu" or not out.is_contiguous()):
        raise ValueError("out must be a contiguous CPU tensor with the shape and dtype of tensor")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _with_context(exc: BaseException, ring: Ring, tag: int) -> BaseException:
    if not isinstance(exc, CommError):
        return exc
    prefix = (
        f"all-reduce tag {tag} on ring {ring.ring_id!r} (rank {ring.rank} of {ring.world_size})"
    )
    new = type(exc)(f"{prefix}: {exc}")
    new.__cause__ = exc
    return new
