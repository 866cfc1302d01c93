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
travels as the codec's raw parts followed by their crc32c (``_Layout``; a zstd codec's output in
its own checksummed format instead): received into one reused buffer, checked, decoded from views
of it and forwarded from it, without copies. The calling thread encodes the first step's
sub-chunks in order while the ring threads already send, so the wire starts after one encode.

Receiving threads wake on a low-water mark (``_frames.recv_exact``), not per TCP segment: on
loopback the wake-ups were a good part of the sending side's CPU.

Failure: every socket operation runs against the operation's deadline. A dead neighbour raises
``PeerFailureError``, a stalled one ``CommTimeoutError``, peers in different operations
``ProtocolError`` - within ``timeout_s``. The first failure aborts all of the ring's sockets, so the
neighbours see the connection end and fail too, around the ring. The input tensor is read only;
the result is copied into it (or into ``out``) after every byte has arrived, so a failed operation
leaves it untouched. A ring whose operation failed is closed; build a new one among the survivors.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c
import numpy as np
import torch

from lowcomm.comm import _frames, _handshake
from lowcomm.comm.errors import (
    CommError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
    TopologyError,
)
from lowcomm.comm.shaper import Shaper

__all__ = ["PeerListener", "Ring", "RingStats", "connect_ring"]

logger = logging.getLogger(__name__)

KIND_RING_DATA = 16
RING_PURPOSE = "ring"
DEFAULT_SUBCHUNK_BYTES = 4 * 1024 * 1024
_OPS = ("sum", "avg", "min", "max")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A sender waits for its next sub-chunk at most this long past the deadline before giving up on
# the receiving thread (which is itself bounded by the deadline).
_GRACE_S = 2.0
_MIN_SUBCHUNKS = 4
_MIN_QUANT_SUBCHUNKS = 8
# Bulk receives wake once this much has arrived (see _frames.recv_exact), not per segment.
_RCVLOWAT = 1 << 20
_CRC = struct.Struct("<I")
# What a sending thread sends: one buffer, or several that travel as one frame.
_Payload = bytes | bytearray | memoryview | list[Any]
_MIN_SUBCHUNK_BYTES = 256 * 1024


class _Codec(Protocol):
    """What the ring needs of a ``lowcomm.compression`` codec."""

    def encode(self, t: torch.Tensor) -> Any: ...

    def decode(self, enc: Any, out: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class RingStats:
    """What one ``all_reduce`` cost this peer: bytes on the wire (frame headers included) and
    wall-clock seconds."""

    tx_bytes: int
    rx_bytes: int
    seconds: float


# ----- listener --------------------------------------------------------------------------------

Handler = Callable[[_frames.Connection, dict[str, Any]], None]


class PeerListener:
    """Accepts authenticated connections in the background and routes them by ``purpose``/``key``.

    A background thread accepts; each new connection runs the handshake in its own short-lived
    thread (bounded by ``handshake_timeout_s``), so a silent or hostile client delays nobody. The
    connector's hello must carry ``"purpose"`` and ``"key"`` strings. A connection whose purpose has
    a handler (``set_handler``) is handed to it on the handshake thread; otherwise it waits in a
    queue for ``wait_for``. A failed handshake or a bad hello is logged and closed; nothing a remote
    process sends can stop the accept thread.

    Thread-safe. ``close()`` closes the listening socket and every connection still queued.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: bytes | str | None,
        shaper: Shaper | None = None,
        max_frame_bytes: int = _frames.DEFAULT_MAX_FRAME_BYTES,
        handshake_timeout_s: float = 10.0,
        hello: dict[str, Any] | None = None,
        max_pending: int = 1024,
        max_handshakes: int = 64,
    ) -> None:
        if handshake_timeout_s <= 0:
            raise ValueError(f"handshake_timeout_s must be > 0, got {handshake_timeout_s}")
        self._token = _handshake.normalize_token(token)
        self._shaper = shaper
        self._max_frame_bytes = max_frame_bytes
        self._handshake_timeout_s = handshake_timeout_s
        self._hello = dict(hello or {})
        self._max_pending = max_pending
        self._handshake_slots = threading.BoundedSemaphore(max_handshakes)
        self._cond = threading.Condition()
        self._pending: dict[tuple[str, str], list[tuple[_frames.Connection, dict[str, Any]]]] = {}
        self._handlers: dict[str, Handler] = {}
        self._closed = False
        self._sock = socket.create_server((host, port), backlog=128)
        # Accept polls so that close() is noticed without relying on shutdown() of a listening
        # socket (which does not wake accept() on every platform).
        self._sock.settimeout(0.2)
        bound = self._sock.getsockname()
        self.address: tuple[str, int] = (host, int(bound[1]))
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"lowcomm-listener-{self.address[1]}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"PeerListener(address={self.address!r})"

    def set_handler(self, purpose: str, handler: Handler | None) -> None:
        """Routes future connections of ``purpose`` to ``handler(conn, hello)`` (called on the
        handshake thread; it owns the connection) instead of the ``wait_for`` queue. ``None``
        removes it."""
        with self._cond:
            if handler is None:
                self._handlers.pop(purpose, None)
            else:
                self._handlers[purpose] = handler

    def wait_for(
        self, purpose: str, key: str, *, count: int, timeout_s: float
    ) -> list[tuple[_frames.Connection, dict[str, Any]]]:
        """Blocks until ``count`` connections with this purpose and key have arrived, removes them
        from the queue and returns them (with their hellos) in arrival order.

        Raises:
            CommTimeoutError: fewer arrived within ``timeout_s`` (those stay queued).
            CommError: the listener is closed.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise CommError(f"listener {self.address} is closed")
                got = self._pending.get((purpose, key), [])
                if len(got) >= count:
                    taken, rest = got[:count], got[count:]
                    self._pending[(purpose, key)] = rest
                    return taken
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeoutError(
                        f"waited {timeout_s:.3g} s for {count} {purpose!r} connections with key "
                        f"{key!r} on {self.address}, {len(got)} arrived: a peer is missing, "
                        "stalled, or uses another ring id"
                    )
                self._cond.wait(left)

    def close(self) -> None:
        """Stops accepting and closes every queued connection. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = [c for items in self._pending.values() for c, _ in items]
            self._pending.clear()
            self._cond.notify_all()
        for conn in pending:
            conn.close()
        self._thread.join(timeout=2.0)
        self._sock.close()

    def _accept_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed:
                    return
                logger.warning("listener %s: accept failed: %s", self.address, exc)
                time.sleep(0.05)
                continue
            if not self._handshake_slots.acquire(blocking=False):
                logger.warning(
                    "listener %s: too many handshakes in progress; refusing", self.address
                )
                client.close()
                continue
            threading.Thread(
                target=self._serve, args=(client,), name="lowcomm-handshake", daemon=True
            ).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            try:
                conn, hello = _handshake.accept(
                    client,
                    token=self._token,
                    hello=self._hello,
                    timeout_s=self._handshake_timeout_s,
                    max_frame_bytes=self._max_frame_bytes,
                    shaper=self._shaper,
                )
            except CommError as exc:
                logger.info("listener %s: refused a connection: %s", self.address, exc)
                return
            purpose, key = hello.get("purpose"), hello.get("key")
            if not isinstance(purpose, str) or not isinstance(key, str):
                logger.info(
                    "listener %s: %s sent a hello without purpose/key", self.address, conn.peer
                )
                conn.close()
                return
            with self._cond:
                handler = self._handlers.get(purpose)
                if handler is None:
                    if self._closed or sum(map(len, self._pending.values())) >= self._max_pending:
                        logger.warning(
                            "listener %s: dropping %s (closed or queue full)",
                            self.address,
                            conn.peer,
                        )
                        conn.close()
                        return
                    self._pending.setdefault((purpose, key), []).append((conn, hello))
                    self._cond.notify_all()
                    return
            try:
                handler(conn, hello)
            except Exception:
                logger.exception("listener %s: handler for %r failed", self.address, purpose)
                conn.close()
        except Exception:  # never let a bug in routing kill anything but this connection
            logger.exception("listener %s: unexpected error serving a connection", self.address)
            with contextlib.suppress(OSError):
                client.close()
        finally:
            self._handshake_slots.release()


# ----- ring --------------------------------------------------------------------------------------


def connect_ring(
    *,
    listener: PeerListener,
    rank: int,
    addresses: Sequence[tuple[str, int]],
    ring_id: str,
    token: bytes | str | None,
    num_connections: int = 4,
    timeout_s: float = 30.0,
    shaper: Shaper | None = None,
    subchunk_bytes: int = DEFAULT_SUBCHUNK_BYTES,
    max_frame_bytes: int = _frames.DEFAULT_MAX_FRAME_BYTES,
    thread_per_connection: bool = True,
) -> Ring:
    """Builds this peer's place in a ring: ``num_connections`` connections to the right-hand
    neighbour (``addresses[(rank + 1) % n]``), and as many accepted from the left-hand one.

    Every member calls it with the same ``addresses`` (the listeners' addresses, in ring order),
    ``ring_id`` and ``num_connections``; use a fresh ``ring_id`` for every new ring (for example the
    topology revision and attempt), so that stale connections of an older ring cannot be mistaken
    for new ones. Blocks up to ``timeout_s``.

    ``thread_per_connection``: True (default, for WAN links) gives each connection its own sending
    and receiving thread, so a stream whose window is full does not hold back the others. False
    uses one sending and one receiving thread that walk the connections in sub-chunk order: the
    same traffic with fewer context switches, faster when the CPU is the bottleneck (loopback,
    several peers per host: about 8% more bus bandwidth at 4 peers on the 2-core dev machine).

    Raises:
        CommTimeoutError: the left-hand neighbour did not connect in time.
        PeerFailureError, AuthenticationError: the right-hand neighbour is unreachable or refused.
        TopologyError: the left-hand neighbour disagrees on the ring (world size, rank, count).
    """
    n = len(addresses)
    if n < 1:
        raise ValueError("addresses must name at least this peer")
    if not 0 <= rank < n:
        raise ValueError(f"rank must be in [0, {n}), got {rank}")
    if num_connections < 1:
        raise ValueError(f"num_connections must be >= 1, got {num_connections}")
    if subchunk_bytes < 4:
        raise ValueError(f"subchunk_bytes must be >= 4, got {subchunk_bytes}")
    if n == 1:
        return Ring(
            rank=0, world_size=1, ring_id=ring_id, send=[], recv=[], subchunk_bytes=subchunk_bytes
        )
    deadline = time.monotonic() + timeout_s
    right_host, right_port = addresses[(rank + 1) % n]
    send: list[_frames.Connection] = []
    recv: list[_frames.Connection] = []
    try:
        for index in range(num_connections):
            conn, _ = _handshake.connect(
                (str(right_host), int(right_port)),
                token=token,
                hello={
                    "purpose": RING_PURPOSE,
                    "key": ring_id,
                    "rank": rank,
                    "world_size": n,
                    "index": index,
                    "num_connections": num_connections,
                },
                timeout_s=max(deadline - time.monotonic(), 1e-3),
                max_frame_bytes=max_frame_bytes,
                shaper=shaper,
            )
            send.append(conn)
        arrived = listener.wait_for(
            RING_PURPOSE,
            ring_id,
            count=num_connections,
            timeout_s=max(deadline - time.monotonic(), 1e-3),
        )
        by_index: dict[int, _frames.Connection] = {}
        left_rank = (rank - 1) % n
        for conn, hello in arrived:
            recv.append(conn)  # closed with the rest on error
            if (
                hello.get("rank") != left_rank
                or hello.get("world_size") != n
                or hello.get("num_connections") != num_connections
                or not isinstance(hello.get("index"), int)
                or hello["index"] in by_index
            ):
                raise TopologyError(
                    f"ring {ring_id!r}: a connection from {conn.peer} claims rank "
                    f"{hello.get('rank')} of {hello.get('world_size')} with "
                    f"{hello.get('num_connections')} connections (index {hello.get('index')}); "
                    f"this peer (rank {rank} of {n}, {num_connections} connections) expected its "
                    f"left neighbour, rank {left_rank}: the peers disagree on the ring"
                )
            by_index[hello["index"]] = conn
        if sorted(by_index) != list(range(num_connections)):
            raise TopologyError(
                f"ring {ring_id!r}: connection indices {sorted(by_index)} are wrong"
            )
        recv = [by_index[i] for i in range(num_connections)]
    except BaseException:
        for conn in send + recv:
            conn.close()
        raise
    return Ring(
        rank=rank,
        world_size=n,
        ring_id=ring_id,
        send=send,
        recv=recv,
        subchunk_bytes=subchunk_bytes,
        thread_per_connection=thread_per_connection,
    )


_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)


def _split(total: int, parts: int, index: int) -> tuple[int, int]:
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


class _Layout:
    """What the raw wire form of one quantized sub-chunk of ``numel`` values looks like: the
    ``Encoded`` parts of the codec, in order, then a crc32c of them (4 bytes, little endian).

    A codec's part layout depends only on its parameters and the shape (``Encoded.from_bytes``
    relies on the same), so both sides derive it from a template encoding of zeros; the frame
    then carries nothing but the parts' bytes and the checksum, and the receiver reads them
    straight into place and decodes views of them (no header parsing, no copies)."""

    __slots__ = ("codec_name", "nbytes", "params", "parts")

    def __init__(self, codec: _Codec, numel: int) -> None:
        template = codec.encode(torch.zeros(numel, dtype=torch.float32))
        self.codec_name: str = template.codec
        self.params: dict[str, Any] = dict(template.params)
        self.parts: list[tuple[str, torch.dtype, tuple[int, ...], int]] = [
            (name, t.dtype, tuple(t.shape), t.numel() * t.element_size())
            for name, t in template.parts.items()
        ]
        self.nbytes = sum(p[3] for p in self.parts) + _CRC.size


class _Op:
    """The state of one all-reduce in flight: buffers, queues, the first failure."""

    def __init__(
        self,
        ring: Ring,
        *,
        src: torch.Tensor,
        res: torch.Tensor,
        stage: torch.Tensor,
        op: str,
        codec: _Codec | None,
        tag: int,
        deadline: float,
    ) -> None:
        n, c = ring.world_size, ring.num_connections
        self.ring = ring
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
        # Sub-chunks of about subchunk_bytes of fp32 values, but at least a few per chunk (down
        # to 256 KiB each) so that even a mid-sized tensor is pipelined. Quantized sub-chunks are
        # cut smaller (their encode and decode are the pipeline's slow stages; at least
        # _MIN_QUANT_SUBCHUNKS per chunk), so that the first bytes leave, and the last are decoded,
        # soon after the op starts and the wire goes quiet.
        min_k = _MIN_SUBCHUNKS if codec is None else _MIN_QUANT_SUBCHUNKS
        self.k = max(
            1,
            -(-max_chunk * 4 // ring.subchunk_bytes),
            min(min_k, -(-max_chunk * 4 // _MIN_SUBCHUNK_BYTES)),
        )
        self.num_messages = 2 * (n - 1) * self.k
        # The op and the codec ride in the top byte of each frame's seq, so peers that disagree on
        # what they are doing fail with a ProtocolError instead of computing garbage.
        self.desc = (_OPS.index(op) | (0x10 if codec is not None else 0)) << 24
        # One sending and one receiving thread per connection, or (thread_per_connection=False) one
        # of each walking all connections in message order: same wire traffic, fewer threads.
        self.num_threads = c if ring.thread_per_connection else 1
        self.num_connections = c
        self.queues: list[queue.SimpleQueue[tuple[int, int, _Payload | None] | None]] = [
            queue.SimpleQueue() for _ in range(self.num_threads)
        ]
        self.res_bytes = _byte_view(res) if codec is None else None
        self.stage_bytes = _byte_view(stage) if codec is None else None
        self.src_bytes = _byte_view(src) if codec is None and src.dtype == torch.float32 else None
        self.error: BaseException | None = None
        self.error_lock = threading.Lock()
        # Set once the calling thread has queued the whole first step (or the op failed).
        self.first_step_done = threading.Event()
        self.encoded_cls: Any = None
        # Quantized sub-chunks travel raw (see _Layout) unless the codec compresses its output
        # (zstd): those travel in the codec's own self-describing, checksummed form.
        self.raw = codec is not None and getattr(codec, "zstd_level", None) is None
        self.arena: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self.recv_offsets: list[int] = []
        if codec is not None:
            self.encoded_cls = importlib.import_module("lowcomm.compression").Encoded
        if self.raw:
            # Every received quantized sub-chunk gets its own slot in one reused buffer: it is
            # decoded from there and, in the all-gather, forwarded from there without a copy.
            offset = 0
            for m in range(self.num_messages):
                step, sub = divmod(m, self.k)
                a, b = self.bounds(self.recv_chunk(step), sub)
                self.recv_offsets.append(offset)
                offset += -(-self.layout(b - a).nbytes // 8) * 8
            self.recv_offsets.append(offset)
            self.arena = ring._arena_for(offset)

    def layout(self, numel: int) -> _Layout:
        assert self.codec is not None
        return self.ring._layout_for(self.codec, numel)

    def bounds(self, chunk: int, sub: int) -> tuple[int, int]:
        lo, hi = _split(self.numel, self.n, chunk)
        if self.align > 1:
            # Whole codec blocks per sub-chunk (the chunk's last one takes the remainder).
            units = -(-(hi - lo) // self.align)
            ua, ub = _split(units, self.k, sub)
            return lo + min(ua * self.align, hi - lo), lo + min(ub * self.align, hi - lo)
        a, b = _split(hi - lo, self.k, sub)
        return lo + a, lo + b

    def send_chunk(self, step: int) -> int:
        r, n = self.ring.rank, self.n
        return (r - step) % n if step < n - 1 else (r + 1 - (step - n + 1)) % n

    def recv_chunk(self, step: int) -> int:
        r, n = self.ring.rank, self.n
        return (r - step - 1) % n if step < n - 1 else (r - (step - n + 1)) % n

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fail(self, exc: BaseException) -> None:
        with self.error_lock:
            if self.error is not None:
                return
            self.error = exc
        self.first_step_done.set()
        # Wake every thread of this op and tell both neighbours at once: they see the connection
        # end and fail in turn, so the failure travels around the ring instead of waiting out
        # everyone's timeout.
        for q in self.queues:
            q.put(None)
        self.ring._abort()

    def push(self, step: int, sub: int, payload: _Payload | None) -> None:
        m = step * self.k + sub
        self.queues[m % self.num_connections % self.num_threads].put((step, sub, payload))

    def encode(self, values: torch.Tensor) -> _Payload:
        """What travels for ``values``: the raw parts plus checksum, or the codec's bytes."""
        assert self.codec is not None
        enc = self.codec.encode(values)
        return self.pack(enc, values.numel()) if self.raw else bytes(enc.to_bytes())

    def pack(self, enc: Any, numel: int) -> list[Any]:
        """The raw wire form of ``enc`` (see ``_Layout``) as buffers that view its parts."""
        layout = self.layout(numel)
        views: list[Any] = []
        crc = 0
        for name, dtype, shape, _nbytes in layout.parts:
            t = enc.parts.get(name)
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                raise CommError(
                    f"codec {layout.codec_name!r} produced part {name!r} unlike its layout for "
                    f"{numel} values: its layout must depend on the shape and parameters only"
                )
            view = memoryview(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
            crc = crc32c.crc32c(view, crc)
            views.append(view)
        views.append(_CRC.pack(crc))
        return views

    def unpack(self, buf: np.ndarray[Any, np.dtype[np.uint8]], numel: int) -> Any:
        """Checks the crc32c of a received raw sub-chunk; returns an ``Encoded`` viewing it."""
        layout = self.layout(numel)
        body = buf[: -_CRC.size]
        (expected,) = _CRC.unpack(buf[-_CRC.size :].tobytes())
        if crc32c.crc32c(body.data) != expected:
            raise ProtocolError(
                "a quantized sub-chunk failed its crc32c check: the data was corrupted in transit"
            )
        parts: dict[str, torch.Tensor] = {}
        offset = 0
        for name, dtype, shape, nbytes in layout.parts:
            raw = torch.from_numpy(body[offset : offset + nbytes])
            parts[name] = (raw.view(dtype) if nbytes else torch.empty(0, dtype=dtype)).view(shape)
            offset += nbytes
        return self.encoded_cls(
            codec=layout.codec_name,
            params=layout.params,
            dtype=torch.float32,
            shape=(numel,),
            parts=parts,
        )

    def decode_into(self, blob: Any, out: torch.Tensor) -> None:
        """Decodes received bytes (or an ``Encoded`` this peer just made) into ``out``."""
        assert self.codec is not None
        try:
            enc = (
                self.encoded_cls.from_bytes(blob)
                if isinstance(blob, bytes | bytearray | memoryview)
                else blob
            )
            decoded = self.codec.decode(enc, out=out)
        except ValueError as exc:  # CodecError is a ValueError
            raise ProtocolError(f"a quantized sub-chunk did not decode: {exc}") from exc
        if decoded.numel() != out.numel():
            raise ProtocolError(
                f"a quantized sub-chunk decoded to {decoded.numel()} values, expected {out.numel()}"
            )
        if decoded.data_ptr() != out.data_ptr():
            out.copy_(decoded)

    # --- threads ---

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
                else:
                    a, b = self.bounds(self.send_chunk(0), sub)
                    self.push(0, sub, self.encode(self.src[a:b]))
                    # Let the sending thread take the core now: on a busy host it otherwise
                    # waits for this thread's time slice to end, and the wire idles meanwhile.
                    _yield()
        finally:
            self.first_step_done.set()

    def run_sender(self, index: int) -> None:
        q = self.queues[index]
        # Items may be queued out of order (the first step is produced while relayed sub-chunks
        # already arrive); each connection must carry its frames in message order.
        held: dict[int, tuple[int, int, _Payload | None]] = {}
        for expected in range(index, self.num_messages, self.num_threads):
            while expected not in held:
                try:
                    item = q.get(timeout=max(self.left(), 0) + _GRACE_S)
                except queue.Empty:
                    raise CommTimeoutError(
                        "no sub-chunk became ready before the deadline"
                    ) from None
                if item is None:
                    return
                held[item[0] * self.k + item[1]] = item
            step, sub, blob = held.pop(expected)
            m = expected
            conn = self.ring._send[m % self.num_connections]
            hook = self.ring.before_send
            if hook is not None:
                hook(step, sub)
            a, b = self.bounds(self.send_chunk(step), sub)
            payload: _Payload
            if self.codec is None:
                if step == 0 and self.src_bytes is not None:
                    payload = self.src_bytes[4 * a : 4 * b].data
                elif step >= self.n - 1:
                    assert self.stage_bytes is not None
                    e = self.stage_esz
                    payload = self.stage_bytes[e * a : e * b].data
                else:
                    assert self.res_bytes is not None
                    payload = self.res_bytes[4 * a : 4 * b].data
            elif blob is not None:
                payload = blob
            else:
                payload = self.encode(self.src[a:b] if step == 0 else self.res[a:b])
            conn.send_frame(
                KIND_RING_DATA,
                payload,
                tag=self.tag,
                seq=self.desc | m,
                timeout_s=max(self.left(), 1e-3),
            )

    def run_receiver(self, index: int) -> None:
        n, last_rs = self.n, self.n - 2
        # The owner's decode of its own encoding (see below) is needed by nobody before the op
        # ends, so it waits for the all-gather: there it runs while the next frame is arriving,
        # instead of in the reduce-scatter, whose encodes and decodes keep the CPU busiest.
        deferred: list[tuple[Any, torch.Tensor]] = []
        for m in range(index, self.num_messages, self.num_threads):
            conn = self.ring._recv[m % self.num_connections]
            if self.error is not None:
                return
            step, sub = divmod(m, self.k)
            if step > last_rs and deferred:
                self.decode_into(*deferred.pop())
            a, b = self.bounds(self.recv_chunk(step), sub)
            region = self.res[a:b]
            blob: _Payload | None = None
            if self.codec is None:
                # Header and payload in one system call, the payload straight into place.
                assert self.res_bytes is not None and self.stage_bytes is not None
                if step <= last_rs:
                    into = self.res_bytes[4 * a : 4 * b].data
                else:
                    into = self.stage_bytes[self.stage_esz * a : self.stage_esz * b].data
                header = conn.recv_frame_into(
                    into, timeout_s=max(self.left(), 1e-3), lowat=_RCVLOWAT
                )
                self.check_header(conn, header, m)
            elif self.raw:
                assert self.arena is not None
                slot = self.arena[
                    self.recv_offsets[m] : self.recv_offsets[m] + self.layout(b - a).nbytes
                ]
                header = conn.recv_frame_into(
                    slot.data, timeout_s=max(self.left(), 1e-3), lowat=_RCVLOWAT
                )
                self.check_header(conn, header, m)
                self.wait_for_first_step(step)
                self.decode_into(self.unpack(slot, b - a), region)
                blob = [slot.data]
            else:
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
                self.decode_into(blob, region)
            if step <= last_rs:
                _reduce(region, self.src[a:b], self.op)
                if step == last_rs:  # this peer owns the chunk now: finish it once, here
                    if self.op == "avg":
                        region.div_(n)
                    if self.stage is not self.res:
                        self.stage[a:b].copy_(region)  # rounded once, here, for everyone
                    if self.codec is not None:
                        # Encode once; this peer keeps exactly what the others will decode.
                        enc = self.codec.encode(region)
                        blob = self.pack(enc, b - a) if self.raw else bytes(enc.to_bytes())
                        deferred.append((enc, region))
                elif self.codec is not None:
                    # Encode the new partial sum here, while it is still in cache.
                    blob = self.encode(region)
            if step < 2 * n - 3:
                self.push(step + 1, sub, blob)
        while deferred and self.error is None:
            self.decode_into(*deferred.pop())

    def wait_for_first_step(self, step: int) -> None:
        """Holds a receiving thread's reduce-scatter work (decode, reduce, encode) until the
        calling thread has encoded the first step. That work is needed only once every first-step
        frame has left (frames leave in order), while each first-step encode gates the wire
        right away: on a CPU-bound host, doing it first keeps the wire busy. It cannot deadlock:
        the first step depends on no other thread or peer."""
        if step <= self.n - 2 and not self.first_step_done.is_set():
            self.first_step_done.wait(max(self.left(), 0))

    def check_header(self, conn: _frames.Connection, header: _frames.FrameHeader, m: int) -> None:
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
                    f"{conn.peer} runs {_describe(theirs)}, this peer {_describe(ours)}: the "
                    "peers disagree on the operation"
                )
            raise ProtocolError(
                f"{conn.peer} sent sub-chunk {header.seq & 0xFFFFFF} where {m} was expected: the "
                "peers cut the tensor differently (different sizes or settings)"
            )


def _describe(desc: int) -> str:
    op = _OPS[desc & 0x3] if desc & 0x3 < len(_OPS) else "?"
    return f"op={op!r} {'quantized' if desc & 0x10 else 'unquantized'}"


class Ring:
    """This peer's connections to its ring neighbours; runs all-reduces over them.

    Made by ``connect_ring``. Operations on one ring run one at a time (a lock serialises
    concurrent callers, in arrival order). Closed after a failed operation.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        ring_id: str,
        send: list[_frames.Connection],
        recv: list[_frames.Connection],
        subchunk_bytes: int = DEFAULT_SUBCHUNK_BYTES,
        thread_per_connection: bool = True,
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
        self._scratch: torch.Tensor | None = None
        self._stage: torch.Tensor | None = None
        # Reused between quantized operations: sub-chunk layouts and the receive buffer.
        self._layouts: dict[tuple[Any, int], _Layout] = {}
        self._arena: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        # Fault-injection seam for tests: called on a sending thread as ``before_send(step, sub)``
        # before each sub-chunk leaves (steps 0..n-2 reduce-scatter, then all-gather).
        self.before_send: Callable[[int, int], None] | None = None
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
        codec: _Codec | None = None,
        tag: int = 0,
        timeout_s: float = 30.0,
        out: torch.Tensor | None = None,
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

        Returns:
            RingStats of this peer.

        Raises:
            PeerFailureError: a neighbour died or aborted; retry with the survivors.
            CommTimeoutError: a neighbour stopped responding within ``timeout_s``.
            ProtocolError: the peers are not running the same operation.
            After any of these ``tensor`` is unchanged and the ring is closed (``out``, if a
            separate tensor, may hold partial values).
        """
        self._check_args(tensor, op, out, timeout_s)
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
                    dest.copy_(tensor)
                return RingStats(0, 0, time.monotonic() - start)
            flat = tensor.view(-1)
            dest_flat = dest.view(-1)
            # Reduce straight into `out` when it is a separate fp32 tensor; otherwise into a
            # scratch buffer that is copied out at the end (the input must survive a failure).
            if (
                dest is not tensor
                and dest.dtype == torch.float32
                and not _overlaps(dest_flat, flat)
            ):
                res = dest_flat
            else:
                res = self._scratch_for(flat.numel())
            stage = res
            if flat.dtype != torch.float32 and codec is None:
                # Only the chunk this peer sends first is read from `res` before it is written.
                lo, hi = _split(flat.numel(), self.world_size, self.rank)
                res[lo:hi].copy_(flat[lo:hi])
                if dest is not tensor and not _overlaps(dest_flat, flat):
                    stage = dest_flat
                else:
                    stage = self._stage_for(flat.numel(), flat.dtype)
            tx0, rx0 = self._bytes()
            state = _Op(
                self,
                src=flat,
                res=res,
                stage=stage,
                op=op,
                codec=codec,
                tag=tag,
                deadline=start + timeout_s,
            )
            self._run_threads(state)
            if state.error is not None:
                raise _with_context(state.error, self, tag)
            if stage.data_ptr() != dest_flat.data_ptr():
                dest_flat.copy_(stage)
            tx1, rx1 = self._bytes()
            return RingStats(tx1 - tx0, rx1 - rx0, time.monotonic() - start)
        finally:
            self._lock.release()

    def _run_threads(self, state: _Op) -> None:
        def guard(fn: Callable[[int], None], index: int) -> None:
            try:
                fn(index)
            except BaseException as exc:
                state.fail(exc)

        threads = [
            threading.Thread(
                target=guard, args=(fn, i), name=f"lowcomm-ring-{name}{i}", daemon=True
            )
            for i in range(state.num_threads)
            for fn, name in ((state.run_receiver, "recv"), (state.run_sender, "send"))
        ]
        for th in threads:
            th.start()
        try:
            state.produce_first_step()
        except BaseException as exc:  # an encode error (NaN input): the op fails like any other
            state.fail(exc)
        # Every blocking call of these threads is bounded by the op's deadline; the grace covers
        # unwinding. One overall bound, not one per thread.
        hard_deadline = state.deadline + 2 * _GRACE_S
        for th in threads:
            th.join(timeout=max(hard_deadline - time.monotonic(), 0))
        if any(th.is_alive() for th in threads):
            state.fail(CommTimeoutError("a ring thread did not finish by the deadline"))
            for th in threads:
                th.join(timeout=max(hard_deadline + _GRACE_S - time.monotonic(), 0))
            # A thread that is still alive may yet write into the scratch buffers: drop them.
            self._scratch = self._stage = self._arena = None

    def _bytes(self) -> tuple[int, int]:
        conns = self._send + self._recv
        return sum(c.tx_bytes for c in conns), sum(c.rx_bytes for c in conns)

    def _stage_for(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self._stage is None or self._stage.numel() < numel or self._stage.dtype != dtype:
            self._stage = torch.empty(numel, dtype=dtype)
        return self._stage[:numel]

    def _layout_for(self, codec: _Codec, numel: int) -> _Layout:
        # Keyed by the codec's value (codecs are frozen dataclasses) or, failing that, identity.
        try:
            key: tuple[Any, int] = (codec, numel)
            hash(key)
        except TypeError:
            key = (id(codec), numel)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 256:
                self._layouts.clear()
            layout = self._layouts[key] = _Layout(codec, numel)
        return layout

    def _arena_for(self, nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        if self._arena is None or self._arena.nbytes < nbytes:
            self._arena = np.empty(max(nbytes, 1), dtype=np.uint8)
        return self._arena[:nbytes]

    def _scratch_for(self, numel: int) -> torch.Tensor:
        # Kept between calls: a fresh 100 MB buffer costs page faults on first touch.
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=torch.float32)
        return self._scratch[:numel]

    def _check_args(
        self, tensor: torch.Tensor, op: str, out: torch.Tensor | None, timeout_s: float
    ) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("tensor must be a contiguous CPU tensor (stage CUDA tensors first)")
        if tensor.dtype not in _DTYPES:
            raise ValueError(
                f"tensor dtype must be float32, float16 or bfloat16, got {tensor.dtype}"
            )
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, got {op!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if out is not None and (
            out.shape != tensor.shape
            or out.dtype != tensor.dtype
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            raise ValueError(
                "out must be a contiguous CPU tensor with the shape and dtype of tensor"
            )


def _byte_view(t: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The bytes of a contiguous 1-D tensor as a numpy array (no copy; works for bf16 too)."""
    return t.view(torch.uint8).numpy()


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
