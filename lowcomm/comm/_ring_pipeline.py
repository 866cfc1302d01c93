"""One ring all-reduce in flight: how the tensor is cut, the threads that move it, its failure.

``Ring.all_reduce`` makes one ``RingPipeline`` per operation and runs it: a receiving thread per
connection reads each sub-chunk straight into its place (reduces it with the local values, or
stores it in the all-gather) and queues it for the next hop; a sending thread per connection
drains that queue in message order; the calling thread produces the first step. The ring's
module docstring (``comm/ring.py``) describes the algorithm and the failure contract.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lowcomm._tensors import byte_array
from lowcomm.comm._frames import Connection, FrameHeader
from lowcomm.comm._ring_buffers import RingBuffers, Undo
from lowcomm.comm._ring_threads import OpThreads
from lowcomm.comm._ring_wire import (
    KIND_RING_DATA,
    Layout,
    Payload,
    decode_add_into,
    decode_into,
    describe,
    op_descriptor,
    pack,
    unpack,
)
from lowcomm.comm.errors import CommTimeoutError, ProtocolError
from lowcomm.compression import Codec, Encoded
from lowcomm.faults import FaultInjector, damaged

__all__ = ["RingLinks", "RingPipeline", "split"]

logger = logging.getLogger(__name__)

# A sender waits for its next sub-chunk at most this long past the deadline before giving up on
# the receiving thread (which is itself bounded by the deadline).
_GRACE_S = 2.0
_MIN_SUBCHUNKS = 4
_MIN_QUANT_SUBCHUNKS = 8
_MIN_SUBCHUNK_BYTES = 256 * 1024
# Bulk receives wake once this much has arrived (see _sockets.recv_exact), not per segment.
_RCVLOWAT = 1 << 20

_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)

# What a sending thread's queue holds: (step, sub, payload made by the receiving thread or None).
_Item = tuple[int, int, Payload | None]


def split(total: int, parts: int, index: int) -> tuple[int, int]:
    """Bounds of part ``index`` when ``total`` items are cut into ``parts`` near-equal parts."""
    base, rem = divmod(total, parts)
    start = index * base + min(index, rem)
    return start, start + base + (1 if index < rem else 0)


def _reduce(dst: torch.Tensor, other: torch.Tensor, op: str) -> None:
    """``dst = dst (op) other`` in place, in fp32 (``other`` may be fp16/bf16)."""
    if op in ("sum", "avg") and other.dtype == torch.float32:
        # numpy: single-threaded and releases the GIL, so it overlaps the other ring threads
        # instead of competing with them through torch's intra-op pool.
        d = dst.numpy()
        np.add(d, other.numpy(), out=d)
    elif op in ("sum", "avg"):
        torch.add(dst, other, out=dst)
    elif op == "min":
        torch.minimum(dst, other, out=dst)
    else:
        torch.maximum(dst, other, out=dst)


def _subchunks_per_chunk(max_chunk: int, subchunk_bytes: int, *, quantized: bool) -> int:
    """How many sub-chunks each of the ``world_size`` chunks (of at most ``max_chunk`` values) is
    cut into.

    Sub-chunks of about subchunk_bytes of fp32 values, but at least a few per chunk (down to 256 KiB
    each) so that even a mid-sized tensor is pipelined. Quantized sub-chunks are cut smaller (their
    encode and decode are the pipeline's slow stages; at least _MIN_QUANT_SUBCHUNKS per chunk), so
    that the first bytes leave, and the last are decoded, soon after the op starts and the wire
    goes quiet."""
    min_k = _MIN_QUANT_SUBCHUNKS if quantized else _MIN_SUBCHUNKS
    return max(
        1,
        -(-max_chunk * 4 // subchunk_bytes),
        min(min_k, -(-max_chunk * 4 // _MIN_SUBCHUNK_BYTES)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RingLinks:
    """What an operation needs of its ring: this peer's place, the connections to the right-hand
    (``send``) and left-hand (``recv``) neighbours, whether all of them seal their frames
    (``protected``: then quantized sub-chunks carry no crc32c), the settings, the reused buffers,
    how to abort the ring, and the fault injector."""

    rank: int
    world_size: int
    send: list[Connection]
    recv: list[Connection]
    protected: bool
    subchunk_bytes: int
    thread_per_connection: bool
    buffers: RingBuffers
    abort: Callable[[], None]
    faults: FaultInjector | None


class RingPipeline:
    """The state of one all-reduce in flight: its cut of the tensor, buffers, queues, threads, and
    the first failure (``error``). Made by ``Ring.all_reduce`` and run once (``run``)."""

    def __init__(
        self,
        links: RingLinks,
        *,
        src: torch.Tensor,
        res: torch.Tensor,
        stage: torch.Tensor,
        op: str,
        codec: Codec | None,
        tag: int,
        deadline: float,
        undo: Undo | None = None,
    ) -> None:
        n, c = links.world_size, len(links.send)
        self.links = links
        self.rank = links.rank
        self.send_conns = links.send
        self.recv_conns = links.recv
        self.faults = links.faults
        self.src = src
        self.res = res
        # Where the all-gather lands: `res` itself (fp32, or any quantized op), or a buffer of the
        # tensor's own fp16/bf16 dtype, so the all-gather moves half the bytes.
        self.stage = stage
        self.stage_esz = stage.element_size()
        self.op = op
        self.codec = codec
        self.tag = tag
        self.deadline = deadline
        self.n = n
        self.numel = src.numel()
        max_chunk = -(-self.numel // n)
        # A codec that quantizes in blocks (``block_size``, e.g. uint8's 65536 values) encodes a
        # sub-chunk of whole blocks in one pass per operation, where a ragged one takes a second
        # pass for its partial block: quantized sub-chunks are cut on block boundaries.
        block = getattr(codec, "block_size", None) if codec is not None else None
        self.align = block if isinstance(block, int) and block > 1 else 1
        self.k = _subchunks_per_chunk(max_chunk, links.subchunk_bytes, quantized=codec is not None)
        self.num_messages = 2 * (n - 1) * self.k
        self.desc = op_descriptor(op, quantized=codec is not None)
        # One sending and one receiving thread per connection, or (thread_per_connection=False) one
        # of each walking all connections in message order: same wire traffic, fewer threads.
        self.num_threads = c if links.thread_per_connection else 1
        self.num_connections = c
        self.queues: list[queue.SimpleQueue[_Item | None]] = [
            queue.SimpleQueue() for _ in range(self.num_threads)
        ]
        self.res_bytes = byte_array(res) if codec is None else None
        self.stage_bytes = byte_array(stage) if codec is None else None
        self.src_bytes = byte_array(src) if codec is None and src.dtype == torch.float32 else None
        # undo= (exact fp32): each region of ``res`` is saved just before it is first written
        # (``save``). In place (``src`` is ``res``) a reduce-scatter sub-chunk lands in ``tmp``:
        # partial sums are forwarded from there, the owned chunk is saved, then reduced in place.
        self.undo = undo
        self.in_place = undo is not None and src.data_ptr() == res.data_ptr()
        self.tmp = links.buffers.scratch(self.numel) if self.in_place else None
        self.tmp_bytes = byte_array(self.tmp) if self.tmp is not None else None
        self.save_locks = [threading.Lock() for _ in range(n * self.k)] if undo is not None else []
        self.saved = [False] * len(self.save_locks)
        self.error: BaseException | None = None
        self.error_lock = threading.Lock()
        # Set once the calling thread has queued the whole first step (or the op failed).
        self.first_step_done = threading.Event()
        # Quantized sub-chunks travel raw (see Layout) unless the codec compresses its output
        # (zstd): those travel in the codec's own self-describing, checksummed form.
        self.raw = codec is not None and getattr(codec, "zstd_level", None) is None
        self.arena: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self.recv_offsets: list[int] = []
        if self.raw:
            self.arena = self._plan_arena()

    def _plan_arena(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Every received quantized sub-chunk gets its own slot in one reused buffer: it is
        decoded from there and, in the all-gather, forwarded from there without a copy."""
        offset = 0
        for m in range(self.num_messages):
            step, sub = divmod(m, self.k)
            a, b = self.bounds(self.recv_chunk(step), sub)
            self.recv_offsets.append(offset)
            offset += -(-self.layout(b - a).nbytes // 8) * 8
        self.recv_offsets.append(offset)
        return self.links.buffers.arena(offset)

    # --- the cut ---

    def layout(self, numel: int) -> Layout:
        assert self.codec is not None
        return self.links.buffers.layout(self.codec, numel, checksum=not self.links.protected)

    def bounds(self, chunk: int, sub: int) -> tuple[int, int]:
        lo, hi = split(self.numel, self.n, chunk)
        if self.align > 1:
            # Whole codec blocks per sub-chunk (the chunk's last one takes the remainder).
            units = -(-(hi - lo) // self.align)
            ua, ub = split(units, self.k, sub)
            return lo + min(ua * self.align, hi - lo), lo + min(ub * self.align, hi - lo)
        a, b = split(hi - lo, self.k, sub)
        return lo + a, lo + b

    def send_chunk(self, step: int) -> int:
        r, n = self.rank, self.n
        return (r - step) % n if step < n - 1 else (r + 1 - (step - n + 1)) % n

    def recv_chunk(self, step: int) -> int:
        r, n = self.rank, self.n
        return (r - step - 1) % n if step < n - 1 else (r - (step - n + 1)) % n

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, chunk: int, sub: int) -> None:
        """Saves region ``sub`` of ``chunk`` of ``res`` unless saved; every writer of ``res``
        calls it first. The first caller saves (under the region's lock), so what is saved is
        what was there before the op, whatever order the threads (or a faulty peer) take."""
        if (undo := self.undo) is None:
            return
        i = chunk * self.k + sub
        with self.save_locks[i]:
            if self.saved[i]:
                return
            a, b = self.bounds(chunk, sub)
            np.copyto(undo.buffer[a:b].numpy(), self.res[a:b].numpy())
            self.saved[i] = True
            undo.saved.append((a, b))

    # --- running ---

    def run(self) -> None:
        """Runs the operation: the ring threads, and the first step on the calling thread. Returns
        once every thread has ended (past the deadline the op fails and waits on); the outcome is
        ``error`` (None on success). An interrupt (KeyboardInterrupt) of the calling thread fails
        the op, waits the same way (``OpThreads``: no ``Thread.join``), then raises."""
        threads = OpThreads()
        overdue = functools.partial(self.fail, CommTimeoutError("a ring thread outlived the op"))
        cause: BaseException | None = None  # what failed or interrupted the calling thread
        interrupt: BaseException | None = None
        try:
            for i in range(self.num_threads):
                for fn, name in ((self.run_receiver, "recv"), (self.run_sender, "send")):
                    target = functools.partial(self._guarded, fn, i)
                    threads.start(target, f"lowcomm-ring-{name}{i}")
            self.produce_first_step()
        except BaseException as exc:  # an encode error (NaN input): the op fails like any other
            cause = exc
            interrupt = None if isinstance(exc, Exception) else exc
        while True:
            try:
                if cause is not None:
                    self.fail(cause)
                if interrupt is not None:
                    self.wake()  # again: an interrupt may have cut the first wake short
                # The threads' blocking calls are bounded by the deadline, the grace covers the
                # unwinding; past it the op fails and the wait goes on (see OpThreads.wait_past).
                if threads.wait_past(self.deadline + 2 * _GRACE_S, _GRACE_S, overdue):
                    self.links.buffers.drop()
                break
            except BaseException as exc:  # interrupted while failing or waiting: wait again
                cause, interrupt = cause or exc, interrupt or exc
        if interrupt is not None:
            raise interrupt

    def _guarded(self, fn: Callable[[int], None], index: int) -> None:
        if self.error is not None:  # begun after the op failed: touches nothing (OpThreads.wait)
            return
        try:
            fn(index)
        except BaseException as exc:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        with self.error_lock:
            if self.error is not None:
                return
            self.error = exc
        self.wake()

    def wake(self) -> None:
        """Wakes every thread of this op and tells both neighbours at once: they see the
        connection end and fail in turn, so the failure travels around the ring instead of
        waiting out everyone's timeout. Idempotent."""
        self.first_step_done.set()
        for q in self.queues:
            q.put(None)
        self.links.abort()

    def push(self, step: int, sub: int, payload: Payload | None) -> None:
        m = step * self.k + sub
        self.queues[m % self.num_connections % self.num_threads].put((step, sub, payload))

    # --- quantized values ---

    def encode(self, values: torch.Tensor) -> Payload:
        """What travels for ``values``: the raw parts (plus checksum on an unsealed ring), or
        the codec's bytes."""
        assert self.codec is not None
        enc = self.codec.encode(values)
        return self._wire_form(enc, values.numel())

    def _wire_form(self, enc: Encoded, numel: int) -> Payload:
        return pack(self.layout(numel), enc, numel) if self.raw else bytes(enc.to_bytes())

    def decode_into(
        self, blob: Encoded | bytes | bytearray | memoryview, out: torch.Tensor
    ) -> None:
        assert self.codec is not None
        decode_into(self.codec, blob, out)

    # --- the calling thread ---

    def produce_first_step(self) -> None:
        """Queues the sub-chunks of the first step, in order (called on the op's own thread while
        the ring threads run). Quantized ones are encoded here, one at a time, so the first can
        leave as soon as it is ready while the next is being encoded."""
        try:
            for sub in range(self.k):
                if self.error is not None:
                    return
                if self.codec is None:
                    self.push(0, sub, None)
                    if sub == self.k - 1 and self.in_place:
                        # Overwritten only in the all-gather: saved while the first step moves.
                        for j in range(self.k):
                            self.save(self.rank, j)
                else:
                    a, b = self.bounds(self.send_chunk(0), sub)
                    self.push(0, sub, self.encode(self.src[a:b]))
                    # Let the sending thread take the core now: on a busy host it otherwise
                    # waits for this thread's time slice to end, and the wire idles meanwhile.
                    _yield()
        finally:
            self.first_step_done.set()

    # --- sending threads ---

    def run_sender(self, index: int) -> None:
        q = self.queues[index]
        # Items may be queued out of order (the first step is produced while relayed sub-chunks
        # already arrive); each connection must carry its frames in message order.
        held: dict[int, _Item] = {}
        for m in range(index, self.num_messages, self.num_threads):
            item = self._take(q, held, m)
            if item is None:
                return
            self.send_message(m, item)

    def send_message(self, m: int, item: _Item) -> None:
        """Sends message ``m`` (``item``: what ``push`` queued for it)."""
        step, sub, blob = item
        conn = self.send_conns[m % self.num_connections]
        corrupt = self.faults is not None and self.faults.hit("ring.send", step=step, sub=sub)
        payload = self._payload(step, sub, blob)
        conn.send_frame(
            KIND_RING_DATA,
            damaged(payload) if corrupt else payload,
            tag=self.tag,
            seq=self.desc | m,
            timeout_s=max(self.left(), 1e-3),
        )

    def _take(
        self, q: queue.SimpleQueue[_Item | None], held: dict[int, _Item], m: int
    ) -> _Item | None:
        """Message ``m``'s item, once it has been queued; None once the op has failed."""
        while m not in held:
            try:
                item = q.get(timeout=max(self.left(), 0) + _GRACE_S)
            except queue.Empty:
                raise CommTimeoutError("no sub-chunk became ready before the deadline") from None
            if item is None:
                return None
            held[item[0] * self.k + item[1]] = item
        return held.pop(m)

    def _payload(self, step: int, sub: int, blob: Payload | None) -> Payload:
        """What sub-chunk ``sub`` of ``step`` sends: a view of the values in place (unquantized),
        the bytes a receiving thread made or forwards, or an encoding made here."""
        a, b = self.bounds(self.send_chunk(step), sub)
        if self.codec is None:
            if step == 0 and self.src_bytes is not None:
                return self.src_bytes[4 * a : 4 * b].data
            if step >= self.n - 1:
                assert self.stage_bytes is not None
                e = self.stage_esz
                return self.stage_bytes[e * a : e * b].data
            if self.tmp_bytes is not None:
                return self.tmp_bytes[4 * a : 4 * b].data
            assert self.res_bytes is not None
            return self.res_bytes[4 * a : 4 * b].data
        if blob is not None:
            return blob
        return self.encode(self.src[a:b] if step == 0 else self.res[a:b])

    # --- receiving threads ---

    def run_receiver(self, index: int) -> None:
        # The owner's decode of its own encoding (see _reduce_step) is needed by nobody before the
        # op ends, so it waits for the all-gather: there it runs while the next frame is arriving,
        # instead of in the reduce-scatter, whose encodes and decodes keep the CPU busiest.
        deferred: list[tuple[Encoded, torch.Tensor]] = []
        for m in range(index, self.num_messages, self.num_threads):
            if self.error is not None:
                return
            self.receive_message(m, deferred)
        while deferred and self.error is None:
            self.decode_into(*deferred.pop())

    def receive_message(self, m: int, deferred: list[tuple[Encoded, torch.Tensor]]) -> None:
        """Receives message ``m`` into place, reduces it, queues what the next step sends."""
        (step, sub), last_rs = divmod(m, self.k), self.n - 2
        if step > last_rs and deferred:
            self.decode_into(*deferred.pop())
        a, b = self.bounds(self.recv_chunk(step), sub)
        conn, region = self.recv_conns[m % self.num_connections], self.res[a:b]
        blob, fused = self._receive(conn, m, step, a, b, region)
        if step <= last_rs and self.tmp is not None:
            self._reduce_in_place(step, sub, a, b)
        elif step <= last_rs:
            blob = self._reduce_step(step, a, b, region, deferred, fused=fused)
        if step < 2 * self.n - 3:
            self.push(step + 1, sub, blob)

    def _receive(
        self, conn: Connection, m: int, step: int, a: int, b: int, region: torch.Tensor
    ) -> tuple[Payload | None, bool]:
        """Receives message ``m`` (values ``a:b`` of ``step``'s chunk) into place: straight into
        the working or staging buffer, or (quantized) decoded into ``region`` (``res[a:b]``).
        Returns the received bytes to forward (quantized, else None) and whether the local
        values were added in the same pass (``fuse_add``)."""
        if self.codec is None:
            # Header and payload in one system call, the payload straight into place.
            assert self.res_bytes is not None and self.stage_bytes is not None
            if step <= self.n - 2 and self.tmp_bytes is not None:
                into = self.tmp_bytes[4 * a : 4 * b].data
            elif step <= self.n - 2:
                self.save(self.recv_chunk(step), m % self.k)
                into = self.res_bytes[4 * a : 4 * b].data
            else:
                self.save(self.recv_chunk(step), m % self.k)
                into = self.stage_bytes[self.stage_esz * a : self.stage_esz * b].data
            header = conn.recv_frame_into(into, timeout_s=max(self.left(), 1e-3), lowat=_RCVLOWAT)
            self.check_header(conn, header, m)
            return None, False
        if self.raw:
            assert self.arena is not None
            slot = self.arena[
                self.recv_offsets[m] : self.recv_offsets[m] + self.layout(b - a).nbytes
            ]
            header = conn.recv_frame_into(
                slot.data, timeout_s=max(self.left(), 1e-3), lowat=_RCVLOWAT
            )
            self.check_header(conn, header, m)
            self.wait_for_first_step(step)
            enc = unpack(self.layout(b - a), slot, b - a)
            assert self.codec is not None
            fused = self.fuse_add(step) and decode_add_into(self.codec, enc, region, self.src[a:b])
            if not fused:
                self.decode_into(enc, region)
            return [slot.data], fused
        header = conn.recv_header(timeout_s=max(self.left(), 1e-3))
        self.check_header(conn, header, m)
        bound = 2 * 4 * (b - a) + 65536
        if header.length > bound:
            raise ProtocolError(
                f"{conn.peer} sent a quantized sub-chunk of {header.length} bytes for "
                f"{b - a} values (bound {bound})"
            )
        blob = bytearray(header.length)
        conn.recv_into(blob, timeout_s=max(self.left(), 1e-3))
        self.wait_for_first_step(step)
        assert self.codec is not None
        fused = self.fuse_add(step) and decode_add_into(self.codec, blob, region, self.src[a:b])
        if not fused:
            self.decode_into(blob, region)
        return blob, fused

    def _reduce_step(
        self,
        step: int,
        a: int,
        b: int,
        region: torch.Tensor,
        deferred: list[tuple[Encoded, torch.Tensor]],
        *,
        fused: bool,
    ) -> Payload | None:
        """Reduces a received reduce-scatter sub-chunk (now in ``region``, ``res[a:b]``) with the
        local values (unless ``_receive`` fused it with the decode); returns what to forward
        (quantized: the new encoding), else None. At the last reduce-scatter step this peer owns
        the chunk and finishes it."""
        if not fused:
            _reduce(region, self.src[a:b], self.op)
        if step < self.n - 2:
            # Encode the new partial sum here, while it is still in cache.
            return self.encode(region) if self.codec is not None else None
        # This peer owns the chunk now: finish it once, here.
        if self.op == "avg":
            region.div_(self.n)
        if self.stage is not self.res:
            self.stage[a:b].copy_(region)  # rounded once, here, for everyone
        if self.codec is None:
            return None
        # Encode once; this peer keeps exactly what the others will decode.
        enc = self.codec.encode(region)
        blob = self._wire_form(enc, b - a)
        deferred.append((enc, region))
        return blob

    def _reduce_in_place(self, step: int, sub: int, a: int, b: int) -> None:
        """``_reduce_step`` of an in-place op with undo (see ``__init__``): the received values
        are in ``tmp[a:b]``, the local ones still in ``res[a:b]``."""
        assert self.tmp is not None
        tmp, local = self.tmp[a:b], self.res[a:b]
        if step < self.n - 2:
            # A partial sum, forwarded from tmp; the local values saved while in cache.
            _reduce(tmp, local, self.op)
            self.save(self.recv_chunk(step), sub)
            return
        # This peer owns the chunk: saved, then finished in place.
        self.save(self.recv_chunk(step), sub)
        _reduce(local, tmp, self.op)
        if self.op == "avg":
            local.div_(self.n)

    def fuse_add(self, step: int) -> bool:
        """Whether a quantized reduce-scatter sub-chunk of ``step`` is decoded and added to the
        local values in one pass (sum/avg of fp32; the codec's ``decode_add``, if it has one)."""
        return step <= self.n - 2 and self.op in ("sum", "avg") and self.src.dtype == torch.float32

    def wait_for_first_step(self, step: int) -> None:
        """Holds a receiving thread's reduce-scatter work (decode, reduce, encode) until the
        calling thread has encoded the first step. That work is needed only once every first-step
        frame has left (frames leave in order), while each first-step encode gates the wire
        right away: on a CPU-bound host, doing it first keeps the wire busy. It cannot deadlock:
        the first step depends on no other thread or peer."""
        if step <= self.n - 2 and not self.first_step_done.is_set():
            self.first_step_done.wait(max(self.left(), 0))

    def check_header(self, conn: Connection, header: FrameHeader, m: int) -> None:
        if header.kind != KIND_RING_DATA:
            raise ProtocolError(f"{conn.peer} sent frame kind {header.kind} inside an all-reduce")
        if header.tag != self.tag:
            raise ProtocolError(
                f"{conn.peer} is in all-reduce tag {header.tag}, this peer in tag {self.tag}: "
                "the peers are running different operations"
            )
        if header.seq != self.desc | m:
            theirs, ours = header.seq >> 24, self.desc >> 24
            if theirs != ours:
                raise ProtocolError(
                    f"{conn.peer} runs {describe(theirs)}, this peer {describe(ours)}: the "
                    "peers disagree on the operation"
                )
            raise ProtocolError(
                f"{conn.peer} sent sub-chunk {header.seq & 0xFFFFFF} where {m} was expected: the "
                "peers cut the tensor differently (different sizes or settings)"
            )
