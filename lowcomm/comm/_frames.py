"""Framing for every lowcomm TCP connection: the frame header, ``Connection``, and the socket loops.

A frame is a fixed 28-byte header followed by ``length`` payload bytes::

    magic b"LCMW" | version u8 | kind u8 | flags u16 | seq u32 | tag u64 | length u64

(network byte order). ``length`` is bounded by the connection's ``max_frame_bytes`` *before* any
payload is read, so a garbage or hostile length claim costs nothing but a closed connection.
Connections are made (and authenticated) by ``_handshake.connect`` and ``_handshake.accept``.

A protected connection (``Connection.protect``, done by the handshake unless encryption is off)
seals every later frame with an AEAD (``_aead``): flags bit 0 is set, the payload travels as
records of ciphertext each followed by its 16-byte tag; ``length`` stays the plaintext length. The receive methods hand the
caller only verified plaintext, so the caller's view of the API is the same either way, except
that after ``recv_header`` the payload must be read by one ``recv_into`` of exactly ``length``.

JSON payloads are parsed with a bounded nesting depth (``MAX_JSON_DEPTH``), so no frame can make
the parser recurse deeply.

Errors: content violations raise ``ProtocolError``; a peer that closes or resets the connection
raises ``PeerFailureError`` (``TruncatedFrameError`` when it happens mid-frame); a call that runs
past its ``timeout_s`` raises ``CommTimeoutError``. After any of these the connection is closed and
the reason logged; the process itself never crashes.

Thread safety: one thread may send while another receives on the same ``Connection``; two
concurrent senders (or two concurrent receivers) must be serialised by the caller.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from lowcomm.comm._aead import FLAG_SEALED, RECORD_SLOTS, TAG_BYTES, FrameCipher, records
from lowcomm.comm._cipher_thread import CipherThread, Pending
from lowcomm.comm._sockets import recv_exact, send_all, send_all_parts
from lowcomm.comm.errors import (
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
    TruncatedFrameError,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HANDSHAKE_MAX_BYTES",
    "HEADER",
    "KIND_USER_MIN",
    "MAGIC",
    "MAX_JSON_DEPTH",
    "VERSION",
    "Connection",
    "Frame",
    "FrameHeader",
    "Sender",
    "Uplink",
    "parse_json_bounded",
    "recv_exact",
    "send_all",
    "send_all_parts",
]

logger = logging.getLogger(__name__)

MAGIC = b"LCMW"
VERSION = 1
HEADER = struct.Struct("!4sBBHIQQ")
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
# Bound for the hello objects (read after authentication).
HANDSHAKE_MAX_BYTES = 64 * 1024
# The deepest JSON nesting any frame may carry (lowcomm's own objects nest 3-4 levels).
MAX_JSON_DEPTH = 32

# Kinds 1-15 belong to the handshake (_handshake.py); 16-63 to the data plane (_ring_wire.py); the
# control plane and users take KIND_USER_MIN and above.
KIND_USER_MIN = 64

# Payloads up to this size are copied next to the header and sent with one syscall.
_COALESCE_BYTES = 64 * 1024
# struct linger {l_onoff, l_linger}: on, 0 s, so close() resets the connection (see abort).
_LINGER_ABORT = struct.pack("ii", 1, 0)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def parse_json_bounded(payload: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``payload`` as JSON, refusing nesting deeper than ``max_depth`` before parsing (so hostile
    input cannot make the parser recurse). Raises ``ValueError`` (a ``json.JSONDecodeError`` or a
    depth error) or ``UnicodeDecodeError``."""
    if payload.count(b"[") + payload.count(b"{") > max_depth:
        # Only then is the exact depth worth computing: brackets outside strings, in order.
        brackets = _JSON_STRING.sub(b'""', payload).translate(None, _NOT_BRACKETS)
        depth = 0
        for b in brackets:
            depth += 1 if b in b"[{" else -1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(payload)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A validated frame header; ``length`` payload bytes follow it on the stream."""

    kind: int
    seq: int
    tag: int
    length: int


@dataclass(frozen=True, slots=True)
class Frame:
    """One received frame with its whole payload."""

    kind: int
    tag: int
    payload: bytes
    seq: int = 0


class Sender(Protocol):
    """Writes whole buffers to a socket by a deadline (direct, or through a ``Shaper``)."""

    def send(self, buffers: Sequence[Buffer], deadline: float) -> None: ...

    def close(self) -> None: ...


class Uplink(Protocol):
    """What a ``Connection`` needs of a link emulator (``shaper.Shaper``): a ``Sender`` that
    wraps a socket's sending side."""

    def attach(self, sock: socket.socket, *, peer: str) -> Sender: ...


class _DirectSender:
    """Unshaped sends straight to the socket."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._sock = sock
        self._peer = peer

    def send(self, buffers: Sequence[Buffer], deadline: float) -> None:
        send_all_parts(self._sock, buffers, deadline)

    def close(self) -> None:
        pass


class Connection:
    """One authenticated, framed TCP connection. Made by ``_handshake.connect`` or ``accept``.

    Every blocking method takes ``timeout_s`` and raises ``CommTimeoutError`` past it. Any error
    closes the connection (so a later call raises ``PeerFailureError`` at once) and logs why.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        shaper: Uplink | None = None,
    ) -> None:
        if max_frame_bytes < HANDSHAKE_MAX_BYTES:
            raise ValueError(f"max_frame_bytes must be >= {HANDSHAKE_MAX_BYTES}")
        self._sock = sock
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self._sender: Sender = (
            shaper.attach(sock, peer=peer) if shaper is not None else _DirectSender(sock, peer)
        )
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._header_buf = bytearray(HEADER.size)
        self._tx_cipher: FrameCipher | None = None
        self._rx_cipher: FrameCipher | None = None
        # Seal / open the records of a multi-record frame on a helper thread, overlapped with the
        # socket calls (see _cipher_thread); False: on the calling thread, in turn with them.
        self.overlap_cipher = True
        self._tx_thread: CipherThread | None = None
        self._rx_thread: CipherThread | None = None
        # A sealed frame whose header recv_header returned: (header bytes, length), until
        # recv_into reads and opens its payload.
        self._rx_open: tuple[bytes, int] | None = None
        # Until authenticated, failures are logged at DEBUG: the owner logs a rejected stranger
        # once per source, so a flood of connections cannot flood the log.
        self.quiet = False
        self.tx_bytes = 0
        self.rx_bytes = 0

    def __repr__(self) -> str:
        return f"Connection(peer={self.peer!r}, closed={self.closed})"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def protected(self) -> bool:
        """Whether frames are sealed (encrypted and authenticated) on this connection."""
        return self._tx_cipher is not None

    def protect(self, *, tx_key: bytes, rx_key: bytes) -> None:
        """Seals every later frame sent with ``tx_key`` and requires every later frame received
        to be sealed with ``rx_key`` (see ``_aead``). Called once, by the handshake, before any
        other thread uses the connection."""
        if self._tx_cipher is not None:
            raise RuntimeError("connection is already protected")
        self._tx_cipher = FrameCipher(tx_key)
        self._rx_cipher = FrameCipher(rx_key)
        self._tx_thread = CipherThread(f"lowcomm-seal-{self.peer}")
        self._rx_thread = CipherThread(f"lowcomm-open-{self.peer}")

    # ----- sending -------------------------------------------------------------------------------

    def send_frame(
        self,
        kind: int,
        payload: Buffer | Sequence[Buffer] = b"",
        *,
        tag: int = 0,
        seq: int = 0,
        timeout_s: float,
    ) -> None:
        """Sends one frame whose payload is a buffer or the concatenation of several (no copy
        for large buffers). Blocks until the bytes are handed to the kernel (or the shaper).

        Raises:
            ValueError: kind/tag/seq out of range or payload over ``max_frame_bytes``.
            CommTimeoutError, PeerFailureError: see the module docstring.
        """
        # bytes and bytearray are Sequences too: only a list or tuple means several buffers.
        parts: list[Buffer] = (
            list(payload) if isinstance(payload, list | tuple) else [cast("Buffer", payload)]
        )
        views = [memoryview(p).cast("B") for p in parts]
        length = sum(v.nbytes for v in views)
        if not 0 <= kind < 256:
            raise ValueError(f"kind must be in [0, 256), got {kind}")
        if not 0 <= tag < 2**64 or not 0 <= seq < 2**32:
            raise ValueError(f"tag must fit in u64 and seq in u32, got tag={tag} seq={seq}")
        if length > self.max_frame_bytes:
            raise ValueError(
                f"frame of {length} bytes exceeds max_frame_bytes={self.max_frame_bytes}"
            )
        cipher = self._tx_cipher
        flags = 0 if cipher is None else FLAG_SEALED
        header = HEADER.pack(MAGIC, VERSION, kind, flags, seq, tag, length)
        if cipher is None:
            self._send_parts(header, views, timeout_s=timeout_s)
            self.tx_bytes += HEADER.size + length
            return
        if self.closed:  # a failed send must not consume a nonce the peer will expect
            raise PeerFailureError(f"connection to {self.peer} is closed")
        # Record by record: each is sealed into a buffer still in cache and leaves at once, so
        # the wire starts after one record's encryption, not the whole frame's; with the helper
        # thread, the next records are sealed while record k is being written.
        deadline = time.monotonic() + timeout_s
        recs = records(length)
        helper = self._tx_thread if self.overlap_cipher and len(recs) > 1 else None
        if helper is None:
            prefix = header
            for start, end in recs:
                out = cipher.seal(header, views, start, end)
                self._send_parts(prefix, [out], timeout_s=max(deadline - time.monotonic(), 1e-3))
                self.tx_bytes += len(prefix) + out.nbytes
                prefix = b""
            return
        # The helper seals up to RECORD_SLOTS records ahead, each into its own buffer slot; a
        # slot is queued again once its record has been written to the socket. With several
        # records queued the helper runs them back to back instead of sleeping and waking (and
        # trading the GIL with this thread) once per record: see _aead.
        slots = min(len(recs), RECORD_SLOTS)
        sealed: list[memoryview] = [memoryview(b"")] * slots

        def seal(index: int) -> None:
            sealed[index % slots] = cipher.seal(header, views, *recs[index], slot=index % slots)

        pending: list[Pending] = [helper.run(functools.partial(seal, i)) for i in range(slots)]
        prefix = header
        try:
            for index in range(len(recs)):
                pending[index % slots].wait()
                out = sealed[index % slots]
                self._send_parts(prefix, [out], timeout_s=max(deadline - time.monotonic(), 1e-3))
                self.tx_bytes += len(prefix) + out.nbytes
                prefix = b""
                if index + slots < len(recs):
                    pending[index % slots] = helper.run(functools.partial(seal, index + slots))
        finally:
            # A queued seal reads the caller's payload (and takes a nonce): wait for all of them.
            for p in pending:
                with contextlib.suppress(BaseException):
                    p.wait()

    def _send_parts(self, header: bytes, views: list[memoryview], *, timeout_s: float) -> None:
        """Sends ``header`` (may be empty) and ``views``: small ones copied into one buffer."""
        wire = sum(v.nbytes for v in views)
        if wire <= _COALESCE_BYTES:
            buffers: list[Buffer] = [header + b"".join(views)]
        else:
            buffers = [header, *views] if header else list(views)
        self._send(buffers, timeout_s=timeout_s)

    def send_json(self, kind: int, obj: Any, *, tag: int = 0, timeout_s: float) -> None:
        """Sends ``obj`` as a UTF-8 JSON frame."""
        self.send_frame(
            kind, json.dumps(obj, separators=(",", ":")).encode(), tag=tag, timeout_s=timeout_s
        )

    def _send(self, buffers: Sequence[Buffer], *, timeout_s: float) -> None:
        if self.closed:
            raise PeerFailureError(f"connection to {self.peer} is closed")
        deadline = time.monotonic() + timeout_s
        try:
            self._sender.send(buffers, deadline)
        except (TimeoutError, CommTimeoutError) as exc:
            self.fail(f"send to {self.peer} timed out after {timeout_s:.3g} s")
            raise CommTimeoutError(
                f"sending to {self.peer} timed out after {timeout_s:.3g} s: the peer stopped "
                "reading (stalled or overloaded)"
            ) from exc
        except OSError as exc:
            self.fail(f"send to {self.peer} failed: {exc}")
            raise PeerFailureError(
                f"connection to {self.peer} failed while sending ({exc}); the peer died or "
                "aborted: retry with the survivors"
            ) from exc

    # ----- receiving -----------------------------------------------------------------------------

    def recv_header(self, *, timeout_s: float) -> FrameHeader:
        """Reads and validates one frame header; the caller must then read exactly
        ``header.length`` payload bytes with one ``recv_into`` before the next header."""
        header = self._recv_header(time.monotonic() + timeout_s, self.max_frame_bytes)
        if self._rx_cipher is not None:
            self._rx_open = (bytes(self._header_buf), header.length)
        return header

    def recv_into(self, view: Buffer, *, timeout_s: float) -> None:
        """Fills ``view`` (a writable buffer) with exactly its size in payload bytes, straight
        from the socket (unprotected), or opened from the sealed bytes into it (protected: the
        whole payload of the frame ``recv_header`` returned, in one call)."""
        mv = memoryview(view).cast("B")
        deadline = time.monotonic() + timeout_s
        cipher = self._rx_cipher
        if cipher is None:
            self._recv_exact(mv, deadline, in_frame=True)
            return
        pending, self._rx_open = self._rx_open, None
        if pending is None or pending[1] != mv.nbytes:
            self.fail("recv_into does not match the sealed frame's length")
            raise ValueError(
                "on a protected connection recv_into must read the whole payload of the frame "
                f"recv_header returned ({pending[1] if pending else 'no frame'} bytes), "
                f"got {mv.nbytes}"
            )
        self._recv_records(cipher, pending[0], mv, deadline)

    def _recv_records(
        self,
        cipher: FrameCipher,
        header: bytes,
        out: memoryview,
        deadline: float,
        *,
        first: bool = False,
        lowat: int = 0,
    ) -> None:
        """Receives and opens a sealed payload into ``out``, record by record (the first one
        already received into the cipher's buffer slot 0 when ``first``); with the helper
        thread, record k is opened while the next ones arrive (up to ``RECORD_SLOTS`` records
        in flight, each in its own buffer slot)."""
        recs = records(out.nbytes)
        helper = self._rx_thread if self.overlap_cipher and len(recs) > 1 else None
        if helper is None:
            for index, (start, end) in enumerate(recs):
                sealed = cipher.buffer(0)[: end - start + TAG_BYTES]
                if index or not first:
                    self._recv_exact(sealed, deadline, in_frame=True, lowat=lowat)
                self._open(cipher, header, sealed, out[start:end])
            return
        # Records land in RECORD_SLOTS buffer slots in turn and are opened on the helper while
        # the next ones arrive; this thread waits for an open only to reuse its slot, and for
        # the last ones at the end (see send_frame). Opens run in the order queued, so the
        # nonces stay in order.
        slots = min(len(recs), RECORD_SLOTS)
        pending: list[Pending | None] = [None] * slots
        try:
            for index, (start, end) in enumerate(recs):
                slot = index % slots
                if (earlier := pending[slot]) is not None:
                    pending[slot] = None
                    earlier.wait()
                sealed = cipher.buffer(slot)[: end - start + TAG_BYTES]
                if index or not first:
                    self._recv_exact(sealed, deadline, in_frame=True, lowat=lowat)
                pending[slot] = helper.run(
                    functools.partial(self._open, cipher, header, sealed, out[start:end])
                )
            for slot in range(slots):
                if (done := pending[slot]) is not None:
                    pending[slot] = None
                    done.wait()
        except BaseException:
            # A queued open writes into the caller's buffer: let them all finish first. A record
            # that failed to open also closed the connection under this thread (which then saw
            # the socket closed): that failure is the cause, and is what this call raises.
            cause: ProtocolError | None = None
            for slot in range(slots):
                if (done := pending[slot]) is not None:
                    pending[slot] = None
                    try:
                        done.wait()
                    except ProtocolError as exc:
                        cause = cause or exc
                    except BaseException:  # the error raised below says it all
                        pass
            if cause is not None:
                raise cause from None
            raise

    def _open(
        self, cipher: FrameCipher, header: bytes, sealed: memoryview, out: memoryview
    ) -> None:
        try:
            cipher.open_into(header, sealed, out, peer=self.peer)
        except ProtocolError as exc:
            self.fail(str(exc))
            raise

    def recv_frame_into(self, view: Buffer, *, timeout_s: float, lowat: int = 0) -> FrameHeader:
        """Reads one frame whose payload must be exactly ``len(view)`` bytes: header and payload
        arrive in one system call, the payload straight into ``view``. A frame of another length
        raises ``ProtocolError`` (bytes past it may have been consumed, so the connection is
        closed). For bulk data whose size both sides know; ``lowat``: see ``recv_exact``."""
        mv = memoryview(view).cast("B")
        cipher = self._rx_cipher
        # Sealed: the header and the first record arrive in one system call.
        into = mv if cipher is None else cipher.buffer(0)[: records(mv.nbytes)[0][1] + TAG_BYTES]
        deadline = time.monotonic() + timeout_s
        self._recv_exact(
            [memoryview(self._header_buf), into], deadline, in_frame=False, lowat=lowat
        )
        header = self._parse_header(self.max_frame_bytes)
        if header.length != mv.nbytes:
            self.fail(f"frame of {header.length} bytes where {mv.nbytes} were expected")
            raise ProtocolError(
                f"{self.peer} sent a frame of {header.length} bytes where {mv.nbytes} were "
                "expected: the two sides disagree on the size of the data"
            )
        if cipher is not None:
            self._recv_records(
                cipher, bytes(self._header_buf), mv, deadline, first=True, lowat=lowat
            )
        return header

    def recv_frame(self, *, timeout_s: float, max_bytes: int | None = None) -> Frame:
        """Reads one whole frame (header and payload, at most ``max_bytes``, by default
        ``max_frame_bytes``; the handshake reads with a smaller bound)."""
        bound = self.max_frame_bytes if max_bytes is None else max_bytes
        return self._recv_frame(time.monotonic() + timeout_s, bound)

    def recv_json(self, *, timeout_s: float) -> tuple[int, int, Any]:
        """Reads one JSON frame; returns ``(kind, tag, obj)``. Bad JSON -> ``ProtocolError``."""
        frame = self.recv_frame(timeout_s=timeout_s)
        return frame.kind, frame.tag, self.parse_json(frame.payload)

    def parse_json(self, payload: bytes) -> Any:
        """``payload`` as JSON (depth-bounded: ``parse_json_bounded``); anything else closes the
        connection and raises ``ProtocolError``."""
        try:
            return parse_json_bounded(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            self.fail(f"malformed JSON payload from {self.peer}")
            raise ProtocolError(f"{self.peer} sent a frame that is not valid JSON: {exc}") from exc

    def _recv_frame(self, deadline: float, bound: int) -> Frame:
        header = self._recv_header(deadline, bound)
        payload = bytearray(header.length)
        cipher = self._rx_cipher
        if cipher is not None:
            self._recv_records(cipher, bytes(self._header_buf), memoryview(payload), deadline)
        elif header.length:
            self._recv_exact(memoryview(payload), deadline, in_frame=True)
        return Frame(header.kind, header.tag, bytes(payload), header.seq)

    def _recv_header(self, deadline: float, bound: int) -> FrameHeader:
        self._recv_exact(memoryview(self._header_buf), deadline, in_frame=False)
        return self._parse_header(bound)

    def _parse_header(self, bound: int) -> FrameHeader:
        magic, version, kind, flags, seq, tag, length = HEADER.unpack(self._header_buf)
        if magic != MAGIC:
            self.fail(f"bad magic {bytes(magic)!r} from {self.peer}")
            raise ProtocolError(
                f"{self.peer} sent bytes that are not a lowcomm frame (magic {bytes(magic)!r}); "
                "connection closed"
            )
        if version != VERSION:
            self.fail(f"wire version {version} from {self.peer}")
            raise ProtocolError(
                f"{self.peer} speaks lowcomm wire version {version}, this process speaks "
                f"{VERSION}: run the same lowcomm version everywhere"
            )
        sealed = self._rx_cipher is not None
        if flags != (FLAG_SEALED if sealed else 0):
            self.fail(f"frame flags {flags:#x} from {self.peer}")
            raise ProtocolError(
                f"{self.peer} sent an {'unsealed' if sealed else 'unknown or sealed'} frame (flags "
                f"{flags:#x}) on a connection that is {'' if sealed else 'not '}protected: "
                "dropped, injected or from another lowcomm version; connection closed"
            )
        if length > bound:
            self.fail(f"frame length {length} over bound {bound} from {self.peer}")
            raise ProtocolError(
                f"{self.peer} announced a frame of {length} bytes, over the bound of {bound} "
                "bytes; connection closed"
            )
        return FrameHeader(kind, seq, tag, length)

    def _recv_exact(
        self,
        mv: memoryview | list[memoryview],
        deadline: float,
        *,
        in_frame: bool,
        lowat: int = 0,
    ) -> None:
        if self.closed:
            raise PeerFailureError(f"connection to {self.peer} is closed")
        views = mv if isinstance(mv, list) else [mv]
        got = 0
        total = sum(v.nbytes for v in views)
        try:
            got = recv_exact(self._sock, views, deadline, lowat=lowat)
        except TimeoutError as exc:
            self.fail(f"receive from {self.peer} timed out")
            raise CommTimeoutError(
                f"receiving from {self.peer} timed out: the peer stopped sending (stalled, or "
                "out of step with this one)"
            ) from exc
        except OSError as exc:
            self.fail(f"receive from {self.peer} failed: {exc}")
            raise PeerFailureError(
                f"connection to {self.peer} failed while receiving ({exc}); the peer died or "
                "aborted: retry with the survivors"
            ) from exc
        self.rx_bytes += got
        if got < total:
            if in_frame or got > 0:
                self.fail(f"{self.peer} closed the connection mid-frame")
                raise TruncatedFrameError(
                    f"{self.peer} closed the connection in the middle of a frame ({got} of "
                    f"{total} bytes); the peer died or aborted: retry with the survivors"
                )
            self.fail(f"{self.peer} closed the connection")
            raise PeerFailureError(
                f"{self.peer} closed the connection; the peer died or left: retry with the "
                "survivors"
            )

    # ----- closing -------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Closes the connection after a violation or failure, logging ``reason`` (once)."""
        if not self.closed:
            logger.log(
                logging.DEBUG if self.quiet else logging.INFO,
                "closing connection to %s: %s",
                self.peer,
                reason,
            )
        self.close()

    def abort(self) -> None:
        """Ends the connection abortively: threads blocked on it wake up with an error at once,
        and so does the peer, even one blocked sending into this side's full receive window.
        Idempotent, thread-safe; for failures only (``close`` is the graceful end).

        The shutdown wakes this side's threads (and sends a FIN); SO_LINGER (on, 0) makes the
        final close send an RST. A FIN alone does not wake a peer blocked in send on a zero
        window, and Linux sends an RST on a plain close only if bytes were left unread: not when
        a receiving thread here reads the queue between the shutdown and the close, and then
        the peer waited out its whole timeout (``tests/comm/test_abort.py``)."""
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self.close()

    def close(self) -> None:
        """Closes the connection. Idempotent, thread-safe."""
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closed.set()
        for helper in (self._tx_thread, self._rx_thread):
            if helper is not None:
                helper.close()
        self._sender.close()
        # shutdown first: close() alone does not wake a thread blocked in recv on Linux.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
