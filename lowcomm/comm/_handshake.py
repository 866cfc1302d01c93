"""The handshake of every lowcomm TCP connection: ``connect``, ``accept`` and the run-token proof.

A new connection first runs a mutual HMAC-SHA256 challenge-response over the run token (each side
proves it knows the token on a fresh nonce of the other side, compared in constant time); only then
are the two ``hello`` JSON objects exchanged. Nothing but the small, bounded handshake frames
(``HANDSHAKE_MAX_BYTES``) is read from a connection before it has authenticated.

Errors: a token mismatch raises ``AuthenticationError``; the framing errors (``ProtocolError``,
``PeerFailureError``, ``CommTimeoutError``) are those of ``_frames``. After any of these the
connection is closed and the reason logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import socket
import time
from typing import Any

from lowcomm.comm._frames import DEFAULT_MAX_FRAME_BYTES, HANDSHAKE_MAX_BYTES, Connection, Frame
from lowcomm.comm.errors import (
    AuthenticationError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
)
from lowcomm.comm.shaper import Shaper

__all__ = [
    "KIND_AUTH_CHALLENGE",
    "KIND_AUTH_HELLO",
    "KIND_AUTH_PROOF",
    "KIND_AUTH_RESULT",
    "KIND_HELLO",
    "accept",
    "connect",
    "normalize_token",
]

# The handshake's frame kinds (1-15 are reserved for it; see _frames).
KIND_AUTH_HELLO = 1
KIND_AUTH_CHALLENGE = 2
KIND_AUTH_PROOF = 3
KIND_AUTH_RESULT = 4
KIND_HELLO = 5

_NONCE_BYTES = 32
_CONNECTOR_LABEL = b"lowcomm-v1-connector\0"
_ACCEPTOR_LABEL = b"lowcomm-v1-acceptor\0"


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def _recv(conn: Connection, deadline: float) -> Frame:
    """One handshake frame, bounded by ``HANDSHAKE_MAX_BYTES``, by the handshake's deadline."""
    return conn.recv_frame(timeout_s=_remaining(deadline), max_bytes=HANDSHAKE_MAX_BYTES)


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


def _configure(sock: socket.socket) -> None:
    sock.settimeout(None)  # blocking mode; deadlines are kernel timeouts (see _frames.send_all)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Kernel buffer sizes are left to TCP autotuning: fixing SO_SNDBUF/SO_RCVBUF disables it,
    # which halved loopback throughput here and would cap a long, fat WAN link.


def _expect(conn: Connection, frame: Frame, kind: int, what: str) -> Any:
    if frame.kind != kind:
        conn.fail(f"unexpected frame kind {frame.kind} during handshake")
        raise ProtocolError(
            f"{conn.peer} sent frame kind {frame.kind} where the handshake expects {what} "
            f"(kind {kind}): not a lowcomm peer, or another protocol version"
        )
    obj = conn.parse_json(frame.payload)
    if not isinstance(obj, dict):
        conn.fail("handshake payload is not an object")
        raise ProtocolError(f"{conn.peer} sent a malformed {what}")
    return obj


def _hex_field(conn: Connection, obj: dict[str, Any], key: str, what: str) -> bytes:
    value = obj.get(key)
    try:
        if not isinstance(value, str):
            raise ValueError
        raw = bytes.fromhex(value)
    except ValueError:
        conn.fail(f"bad {key!r} in {what}")
        raise ProtocolError(f"{conn.peer} sent a {what} without a valid {key!r} field") from None
    if len(raw) != _NONCE_BYTES:
        conn.fail(f"bad {key!r} length in {what}")
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
    frame = _recv(conn, deadline)
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
            conn.fail("acceptor failed to prove the run token")
            raise AuthenticationError(
                f"run token rejected by {conn.peer}: it holds a different run token than this "
                "process (its HMAC proof did not verify); give every process the same token"
            )
        proof_c = _mac(key, _CONNECTOR_LABEL, nonce_a, nonce_c)
        conn.send_json(KIND_AUTH_PROOF, {"proof": proof_c.hex()}, timeout_s=left())
        result = _expect(
            conn,
            _recv(conn, deadline),
            KIND_AUTH_RESULT,
            "authentication result",
        )
        if result.get("ok") is not True:
            conn.close()
            raise AuthenticationError(
                f"run token rejected by {conn.peer}: {result.get('reason', 'no reason given')}"
            )
    conn.send_json(KIND_HELLO, hello, timeout_s=left())
    their_hello = _expect(conn, _recv(conn, deadline), KIND_HELLO, "hello")
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
        conn.fail(f"authentication failed: {reason}")
        return AuthenticationError(f"connection from {conn.peer} refused: {reason}")

    first = _expect(
        conn,
        _recv(conn, deadline),
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
            _recv(conn, deadline),
            KIND_AUTH_PROOF,
            "authentication proof",
        )
        proof_c = _hex_field(conn, proof, "proof", "authentication proof")
        if not hmac.compare_digest(proof_c, _mac(key, _CONNECTOR_LABEL, nonce_a, nonce_c)):
            raise reject("wrong run token (HMAC proof did not verify)")
        conn.send_json(KIND_AUTH_RESULT, {"ok": True}, timeout_s=left())
    their_hello = _expect(conn, _recv(conn, deadline), KIND_HELLO, "hello")
    conn.send_json(KIND_HELLO, hello, timeout_s=left())
    return dict(their_hello)
