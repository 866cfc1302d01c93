"""Framing and authentication for every lowcomm TCP connection (peer to peer, peer to master).

A frame is a fixed 28-byte header followed by ``length`` payload bytes::

    magic b"LCMW" | version u8 | kind u8 | flags u16 (0) | seq u32 | tag u64 | length u64

(network byte order). ``length`` is bounded by the connection's ``max_frame_bytes`` *before* any
payload is read, so a garbage or hostile length claim costs nothing but a closed connection.

A new connection first runs a mutual HMAC-SHA256 challenge-response over the run token (each side
proves it knows the token on a fresh nonce of the other side, compared in constant time); only then
are the two ``hello`` JSON objects exchanged. Nothing but the small, bounded handshake frames is
read from a connection before it has authenticated.

Errors: content violations raise ``ProtocolError``; a peer that closes or resets the connection
raises ``PeerFailureError`` (``TruncatedFrameError`` when it happens mid-frame); a call that runs past
its ``timeout_s`` raises ``CommTimeoutError``; a token mismatch raises ``AuthenticationError``. After
any of these the connection is closed and the reason logged; the process itself never crashes.

Thread safety: one thread may send while another receives on the same ``Connection``; two
concurrent senders (or two concurrent receivers) must be serialised by the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from lowcomm.comm.errors import (
    AuthenticationError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
    TruncatedFrameError,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from lowcomm.comm._shaper import Shaper

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HANDSHAKE_MAX_BYTES",
    "HEADER",
    "KIND_USER_MIN",
    "MAGIC",
    "VERSION",
    "Connection",
    "Frame",
    "FrameHeader",
    "accept",
    "connect",
    "normalize_token",
]

logger = logging.getLogger(__name__)

MAGIC = b"LCMW"
VERSION = 1
HEADER = struct.Struct("!4sBBHIQQ")
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
# Bound for every frame read before the peer has authenticated (and for the hello objects).
HANDSHAKE_MAX_BYTES = 64 * 1024

# Kinds 1-15 belong to this module (the handshake); 16-63 to the data plane (ring.py); the control
# plane and users take KIND_USER_MIN and above.
KIND_AUTH_HELLO = 1
KIND_AUTH_CHALLENGE = 2
KIND_AUTH_PROOF = 3
KIND_AUTH_RESULT = 4
KIND_HELLO = 5
KIND_USER_MIN = 64

_NONCE_BYTES = 32
_CONNECTOR_LABEL = b"lowcomm-v1-connector\0"
_ACCEPTOR_LABEL = b"lowcomm-v1-acceptor\0"
# Payloads up to this size are copied next to the header and sent with one syscall.
_COALESCE_BYTES = 64 * 1024


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


class _Sender(Protocol):
    """Writes whole buffers to a socket by a deadline (direct, or through a ``Shaper``)."""

    def send(self, buffers: Sequence[Buffer], deadline: float) -> None: ...

    def close(self) -> None: ...


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


_TIMEVAL = struct.Struct("@ll")


def _set_kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    # Connections run in blocking mode with SO_RCVTIMEO / SO_SNDTIMEO instead of Python socket
    # timeouts: a Python timeout makes every recv a poll() plus a non-blocking recv that returns
    # whatever has arrived (one thread wake-up and GIL round trip per few KiB), whereas a blocking
    # recv with MSG_WAITALL fills a whole multi-MiB sub-chunk in one call. The two options are
    # independent, so a sending and a receiving thread keep their own deadlines.
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))
    )


def send_all(sock: socket.socket, data: Buffer, deadline: float) -> None:
    """Writes all of ``data`` to a blocking socket by ``deadline``.

    Raises ``TimeoutError`` past the deadline and ``OSError`` if the connection fails."""
    view = memoryview(data).cast("B")
    sent, total = 0, view.nbytes
    while sent < total:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"sent {sent} of {total} bytes before the deadline")
        _set_kernel_timeout(sock, socket.SO_SNDTIMEO, left)
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:  # SO_SNDTIMEO expired with nothing sent; the loop checks the time
            continue


def send_all_parts(sock: socket.socket, buffers: Sequence[Buffer], deadline: float) -> None:
    """Like ``send_all`` for the concatenation of ``buffers``, written with ``sendmsg`` so that
    a frame header and its payload leave in one system call (no separate tiny segment)."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    while views:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("send ran past its deadline")
        _set_kernel_timeout(sock, socket.SO_SNDTIMEO, left)
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError:  # SO_SNDTIMEO expired with nothing sent
            continue
        _advance(views, sent)


def _advance(views: list[memoryview], nbytes: int) -> None:
    """Drops the first ``nbytes`` of ``views`` (in place): what one partial send or recv moved."""
    while nbytes and views:
        if nbytes >= views[0].nbytes:
            nbytes -= views[0].nbytes
            views.pop(0)
        else:
            views[0] = views[0][nbytes:]
            nbytes = 0


_SO_RCVLOWAT: int | None = getattr(socket, "SO_RCVLOWAT", None)


def recv_exact(
    sock: socket.socket, views: Sequence[memoryview], deadline: float, *, lowat: int = 0
) -> int:
    """Fills ``views`` in order from a blocking socket by ``deadline`` (one ``recvmsg_into`` with
    MSG_WAITALL when nothing goes wrong); returns the bytes received, which is fewer than their
    total only if the peer closed the connection.

    ``lowat`` > 0 (bulk data): instead of MSG_WAITALL, each call sets SO_RCVLOWAT to
    ``min(lowat, half the bytes still missing)``, so the kernel wakes this thread once that much
    has arrived rather than for every segment. On loopback that cuts the sending side's CPU (its
    softirq does the wake-ups) and some on this side. Why half: within one call the kernel keeps
    the mark after a partial copy (it copies early when the receive window fills), and wakes
    again only once another ``mark`` bytes are buffered. The call returns as soon as it has
    copied ``mark`` bytes, so a stall would need more than ``missing - mark`` bytes copied but
    fewer than ``mark``, impossible while ``mark <= missing / 2``. The mark is reset to 1 on
    return, so that later small reads on the socket are woken as usual.

    Raises ``TimeoutError`` past the deadline and ``OSError`` if the connection fails."""
    pending = [v for v in views if v.nbytes]
    got = 0
    use_lowat = lowat > 0 and _SO_RCVLOWAT is not None
    flags = 0 if use_lowat else socket.MSG_WAITALL
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"received {got} bytes before the deadline")
            _set_kernel_timeout(sock, socket.SO_RCVTIMEO, left)
            if use_lowat:
                assert _SO_RCVLOWAT is not None
                missing = sum(v.nbytes for v in pending)
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, max(1, min(lowat, missing // 2)))
            try:
                if len(pending) == 1:
                    n = sock.recv_into(pending[0], pending[0].nbytes, flags)
                else:
                    n = sock.recvmsg_into(pending, 0, flags)[0]
            except BlockingIOError:  # SO_RCVTIMEO expired with nothing received
                continue
            if n == 0:
                break
            got += n
            _advance(pending, n)
    finally:
        if use_lowat:
            assert _SO_RCVLOWAT is not None
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, 1)
    return got


class _DirectSender:
    """Unshaped sends straight to the socket."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._sock = sock
        self._peer = peer

    def send(self, buffers: Sequence[Buffer], deadline: float) -> None:
        send_all_parts(self._sock, buffers, deadline)

    def close(self) -> None:
        pass


def normalize_token(token: bytes | str | None) -> bytes | None:
    """The run token as bytes (``None`` means no authentication). Raises ``ValueError`` if empty."""
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode()
    if not isinstance(token, bytes | bytearray) or len(token) == 0:
        raise ValueError("token must be a non-empty bytes or str, or None for no authentication")
    return bytes(token)


def _mac(token: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, label + first + second, hashlib.sha256).digest()


class Connection:
    """One authenticated, framed TCP connection. Made by ``connect`` or ``accept``, not directly.

    Every blocking method takes ``timeout_s`` and raises ``CommTimeoutError`` past it. Any error
    closes the connection (so a later call raises ``PeerFailureError`` at once) and logs why.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        shaper: Shaper | None = None,
    ) -> None:
        if max_frame_bytes < HANDSHAKE_MAX_BYTES:
            raise ValueError(f"max_frame_bytes must be >= {HANDSHAKE_MAX_BYTES}")
        self._sock = sock
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self._sender: _Sender = (
            shaper.attach(sock, peer=peer) if shaper is not None else _DirectSender(sock, peer)
        )
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._header_buf = bytearray(HEADER.size)
        self.tx_bytes = 0
        self.rx_bytes = 0

    def __repr__(self) -> str:
        return f"Connection(peer={self.peer!r}, closed={self.closed})"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def fileno(self) -> int:
        return self._sock.fileno()

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
        header = HEADER.pack(MAGIC, VERSION, kind, 0, seq, tag, length)
        if length <= _COALESCE_BYTES:
            buffers: list[Buffer] = [header + b"".join(views)]
        else:
            buffers = [header, *views]
        self._send(buffers, timeout_s=timeout_s)
        self.tx_bytes += HEADER.size + length

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
            self._fail(f"send to {self.peer} timed out after {timeout_s:.3g} s")
            raise CommTimeoutError(
                f"sending to {self.peer} timed out after {timeout_s:.3g} s: the peer stopped "
                "reading (stalled or overloaded)"
            ) from exc
        except OSError as exc:
            self._fail(f"send to {self.peer} failed: {exc}")
            raise PeerFailureError(
                f"connection to {self.peer} failed while sending ({exc}); the peer died or "
                "aborted: retry with the survivors"
            ) from exc

    # ----- receiving -----------------------------------------------------------------------------

    def recv_header(self, *, timeout_s: float) -> FrameHeader:
        """Reads and validates one frame header; the caller must then read exactly
        ``header.length`` payload bytes (``recv_into``) before the next header."""
        return self._recv_header(time.monotonic() + timeout_s, self.max_frame_bytes)

    def recv_into(self, view: Buffer, *, timeout_s: float) -> None:
        """Fills ``view`` (a writable buffer) with exactly its size in payload bytes, straight
        from the socket (no intermediate copy)."""
        mv = memoryview(view).cast("B")
        self._recv_exact(mv, time.monotonic() + timeout_s, in_frame=True)

    def recv_frame_into(self, view: Buffer, *, timeout_s: float, lowat: int = 0) -> FrameHeader:
        """Reads one frame whose payload must be exactly ``len(view)`` bytes: header and payload
        arrive in one system call, the payload straight into ``view``. A frame of another length
        raises ``ProtocolError`` (bytes past it may have been consumed, so the connection is
        closed). For bulk data whose size both sides know; ``lowat``: see ``recv_exact``."""
        mv = memoryview(view).cast("B")
        self._recv_exact(
            [memoryview(self._header_buf), mv],
            time.monotonic() + timeout_s,
            in_frame=False,
            lowat=lowat,
        )
        header = self._parse_header(self.max_frame_bytes)
        if header.length != mv.nbytes:
            self._fail(f"frame of {header.length} bytes where {mv.nbytes} were expected")
            raise ProtocolError(
                f"{self.peer} sent a frame of {header.length} bytes where {mv.nbytes} were "
                "expected: the two sides disagree on the size of the data"
            )
        return header

    def recv_frame(self, *, timeout_s: float) -> Frame:
        """Reads one whole frame (header and payload, at most ``max_frame_bytes``)."""
        return self._recv_frame(time.monotonic() + timeout_s, self.max_frame_bytes)

    def recv_json(self, *, timeout_s: float) -> tuple[int, int, Any]:
        """Reads one JSON frame; returns ``(kind, tag, obj)``. Bad JSON -> ``ProtocolError``."""
        frame = self.recv_frame(timeout_s=timeout_s)
        return frame.kind, frame.tag, self._parse_json(frame.payload)

    def _parse_json(self, payload: bytes) -> Any:
        try:
            return json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._fail(f"malformed JSON payload from {self.peer}")
            raise ProtocolError(f"{self.peer} sent a frame that is not valid JSON: {exc}") from exc

    def _recv_frame(self, deadline: float, bound: int) -> Frame:
        header = self._recv_header(deadline, bound)
        payload = bytearray(header.length)
        if header.length:
            self._recv_exact(memoryview(payload), deadline, in_frame=True)
        return Frame(header.kind, header.tag, bytes(payload), header.seq)

    def _recv_header(self, deadline: float, bound: int) -> FrameHeader:
        self._recv_exact(memoryview(self._header_buf), deadline, in_frame=False)
        return self._parse_header(bound)

    def _parse_header(self, bound: int) -> FrameHeader:
        magic, version, kind, _flags, seq, tag, length = HEADER.unpack(self._header_buf)
        if magic != MAGIC:
            self._fail(f"bad magic {bytes(magic)!r} from {self.peer}")
            raise ProtocolError(
                f"{self.peer} sent bytes that are not a lowcomm frame (magic {bytes(magic)!r}); "
                "connection closed"
            )
        if version != VERSION:
            self._fail(f"wire version {version} from {self.peer}")
            raise ProtocolError(
                f"{self.peer} speaks lowcomm wire version {version}, this process speaks "
                f"{VERSION}: run the same lowcomm version everywhere"
            )
        if length > bound:
            self._fail(f"frame length {length} over bound {bound} from {self.peer}")
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
            self._fail(f"receive from {self.peer} timed out")
            raise CommTimeoutError(
                f"receiving from {self.peer} timed out: the peer stopped sending (stalled, or "
                "out of step with this one)"
            ) from exc
        except OSError as exc:
            self._fail(f"receive from {self.peer} failed: {exc}")
            raise PeerFailureError(
                f"connection to {self.peer} failed while receiving ({exc}); the peer died or "
                "aborted: retry with the survivors"
            ) from exc
        self.rx_bytes += got
        if got < total:
            if in_frame or got > 0:
                self._fail(f"{self.peer} closed the connection mid-frame")
                raise TruncatedFrameError(
                    f"{self.peer} closed the connection in the middle of a frame ({got} of "
                    f"{total} bytes); the peer died or aborted: retry with the survivors"
                )
            self._fail(f"{self.peer} closed the connection")
            raise PeerFailureError(
                f"{self.peer} closed the connection; the peer died or left: retry with the "
                "survivors"
            )

    # ----- closing -------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if not self.closed:
            logger.info("closing connection to %s: %s", self.peer, reason)
        self.close()

    def abort(self) -> None:
        """Shuts the socket down in both directions so that threads blocked on it wake up with an
        error at once and the peer sees the connection end. Idempotent, thread-safe."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self.close()

    def close(self) -> None:
        """Closes the connection. Idempotent, thread-safe."""
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closed.set()
        self._sender.close()
        # shutdown first: close() alone does not wake a thread blocked in recv on Linux.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


# ----- handshake -----------------------------------------------------------------------------


def _configure(sock: socket.socket) -> None:
    sock.settimeout(None)  # blocking mode; deadlines are kernel timeouts (see send_all)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Kernel buffer sizes are left to TCP autotuning: fixing SO_SNDBUF/SO_RCVBUF disables it,
    # which halved loopback throughput here and would cap a long, fat WAN link.


def _expect(conn: Connection, frame: Frame, kind: int, what: str) -> Any:
    if frame.kind != kind:
        conn._fail(f"unexpected frame kind {frame.kind} during handshake")
        raise ProtocolError(
            f"{conn.peer} sent frame kind {frame.kind} where the handshake expects {what} "
            f"(kind {kind}): not a lowcomm peer, or another protocol version"
        )
    obj = conn._parse_json(frame.payload)
    if not isinstance(obj, dict):
        conn._fail("handshake payload is not an object")
        raise ProtocolError(f"{conn.peer} sent a malformed {what}")
    return obj


def _hex_field(conn: Connection, obj: dict[str, Any], key: str, what: str) -> bytes:
    value = obj.get(key)
    try:
        if not isinstance(value, str):
            raise ValueError
        raw = bytes.fromhex(value)
    except ValueError:
        conn._fail(f"bad {key!r} in {what}")
        raise ProtocolError(f"{conn.peer} sent a {what} without a valid {key!r} field") from None
    if len(raw) != _NONCE_BYTES:
        conn._fail(f"bad {key!r} length in {what}")
        raise ProtocolError(f"{conn.peer} sent a {what} with a {key!r} of the wrong length")
    return raw


def connect(
    address: tuple[str, int],
    *,
    token: bytes | str | None,
    hello: dict[str, Any],
    timeout_s: float = 10.0,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    shaper: Shaper | None = None,
) -> tuple[Connection, dict[str, Any]]:
    """Opens a TCP connection to ``address``, authenticates both ways, exchanges hellos.

    Blocks up to ``timeout_s`` in total. Returns the connection and the acceptor's hello.

    Raises:
        AuthenticationError: the acceptor does not know our token (message starts with
            "run token rejected by"), or only one side uses a token.
        PeerFailureError: nothing listens there, or the acceptor closed the connection.
        CommTimeoutError, ProtocolError: see the module docstring.
    """
    key = normalize_token(token)
    deadline = time.monotonic() + timeout_s
    peer = f"{address[0]}:{address[1]}"
    try:
        sock = socket.create_connection(address, timeout=max(_remaining(deadline), 1e-3))
    except TimeoutError as exc:
        raise CommTimeoutError(f"connecting to {peer} timed out after {timeout_s:.3g} s") from exc
    except OSError as exc:
        raise PeerFailureError(f"cannot connect to {peer}: {exc}") from exc
    _configure(sock)
    conn = Connection(sock, peer=peer, max_frame_bytes=max_frame_bytes, shaper=shaper)
    try:
        return conn, _connect_handshake(conn, key, hello, deadline)
    except BaseException:
        conn.close()
        raise


def _connect_handshake(
    conn: Connection, key: bytes | None, hello: dict[str, Any], deadline: float
) -> dict[str, Any]:
    def left() -> float:
        return max(_remaining(deadline), 1e-3)

    nonce_c = os.urandom(_NONCE_BYTES)
    conn.send_json(
        KIND_AUTH_HELLO, {"auth": key is not None, "nonce": nonce_c.hex()}, timeout_s=left()
    )
    frame = conn._recv_frame(deadline, HANDSHAKE_MAX_BYTES)
    if frame.kind == KIND_AUTH_RESULT:
        result = _expect(conn, frame, KIND_AUTH_RESULT, "authentication result")
        conn.close()
        raise AuthenticationError(
            f"run token rejected by {conn.peer}: {result.get('reason', 'no reason given')}"
        )
    challenge = _expect(conn, frame, KIND_AUTH_CHALLENGE, "authentication challenge")
    their_auth = bool(challenge.get("auth"))
    if key is None or not their_auth:
        if key is not None or their_auth:
            conn.close()
            raise AuthenticationError(
                f"run token rejected by {conn.peer}: "
                + (
                    "it uses no run token but this process has one; give both the same token"
                    if key is not None
                    else "it requires a run token and this process has none"
                )
            )
    else:
        nonce_a = _hex_field(conn, challenge, "nonce", "authentication challenge")
        proof_a = _hex_field(conn, challenge, "proof", "authentication challenge")
        if not hmac.compare_digest(proof_a, _mac(key, _ACCEPTOR_LABEL, nonce_c, nonce_a)):
            conn._fail("acceptor failed to prove the run token")
            raise AuthenticationError(
                f"run token rejected by {conn.peer}: it holds a different run token than this "
                "process (its HMAC proof did not verify); give every process the same token"
            )
        proof_c = _mac(key, _CONNECTOR_LABEL, nonce_a, nonce_c)
        conn.send_json(KIND_AUTH_PROOF, {"proof": proof_c.hex()}, timeout_s=left())
        result = _expect(
            conn,
            conn._recv_frame(deadline, HANDSHAKE_MAX_BYTES),
            KIND_AUTH_RESULT,
            "authentication result",
        )
        if result.get("ok") is not True:
            conn.close()
            raise AuthenticationError(
                f"run token rejected by {conn.peer}: {result.get('reason', 'no reason given')}"
            )
    conn.send_json(KIND_HELLO, hello, timeout_s=left())
    their_hello = _expect(
        conn, conn._recv_frame(deadline, HANDSHAKE_MAX_BYTES), KIND_HELLO, "hello"
    )
    return dict(their_hello)


def accept(
    sock: socket.socket,
    *,
    token: bytes | str | None,
    hello: dict[str, Any],
    timeout_s: float = 10.0,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    shaper: Shaper | None = None,
) -> tuple[Connection, dict[str, Any]]:
    """Runs the acceptor's side of the handshake on a freshly accepted socket (takes ownership of
    it: closed on any failure). Blocks up to ``timeout_s``. Returns the connection and the
    connector's hello.

    Raises:
        AuthenticationError: the connector failed to prove the token (it was told why).
        ProtocolError, PeerFailureError, CommTimeoutError: see the module docstring.
    """
    key = normalize_token(token)
    deadline = time.monotonic() + timeout_s
    try:
        host, port = sock.getpeername()[:2]
        peer = f"{host}:{port}"
    except OSError:
        peer = "unknown peer"
    _configure(sock)
    conn = Connection(sock, peer=peer, max_frame_bytes=max_frame_bytes, shaper=shaper)
    try:
        return conn, _accept_handshake(conn, key, hello, deadline)
    except BaseException:
        conn.close()
        raise


def _accept_handshake(
    conn: Connection, key: bytes | None, hello: dict[str, Any], deadline: float
) -> dict[str, Any]:
    def left() -> float:
        return max(_remaining(deadline), 1e-3)

    def reject(reason: str) -> AuthenticationError:
        # The connector may already be gone; the rejection stands either way.
        with contextlib.suppress(Exception):
            conn.send_json(KIND_AUTH_RESULT, {"ok": False, "reason": reason}, timeout_s=left())
        conn._fail(f"authentication failed: {reason}")
        return AuthenticationError(f"connection from {conn.peer} refused: {reason}")

    first = _expect(
        conn,
        conn._recv_frame(deadline, HANDSHAKE_MAX_BYTES),
        KIND_AUTH_HELLO,
        "authentication hello",
    )
    their_auth = bool(first.get("auth"))
    nonce_c = _hex_field(conn, first, "nonce", "authentication hello")
    if key is None:
        # The connector decides whether talking to an unauthenticated acceptor is acceptable.
        conn.send_json(KIND_AUTH_CHALLENGE, {"auth": False}, timeout_s=left())
    else:
        if not their_auth:
            raise reject("this process requires a run token and the connecting one has none")
        nonce_a = os.urandom(_NONCE_BYTES)
        proof_a = _mac(key, _ACCEPTOR_LABEL, nonce_c, nonce_a)
        conn.send_json(
            KIND_AUTH_CHALLENGE,
            {"auth": True, "nonce": nonce_a.hex(), "proof": proof_a.hex()},
            timeout_s=left(),
        )
        proof = _expect(
            conn,
            conn._recv_frame(deadline, HANDSHAKE_MAX_BYTES),
            KIND_AUTH_PROOF,
            "authentication proof",
        )
        proof_c = _hex_field(conn, proof, "proof", "authentication proof")
        if not hmac.compare_digest(proof_c, _mac(key, _CONNECTOR_LABEL, nonce_a, nonce_c)):
            raise reject("wrong run token (HMAC proof did not verify)")
        conn.send_json(KIND_AUTH_RESULT, {"ok": True}, timeout_s=left())
    their_hello = _expect(
        conn, conn._recv_frame(deadline, HANDSHAKE_MAX_BYTES), KIND_HELLO, "hello"
    )
    conn.send_json(KIND_HELLO, hello, timeout_s=left())
    return dict(their_hello)
