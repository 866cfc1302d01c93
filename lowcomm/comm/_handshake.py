"""The handshake of every lowcomm TCP connection: ``connect``, ``accept``, the run-token proof and
the connection's keys.

The exchange (all but the last step before authentication, each frame at most
``PREAUTH_MAX_BYTES`` and depth-bounded JSON)::

    connector -> acceptor   AUTH_HELLO      {"v", "auth", "encryption", "nonce": Nc}
    acceptor  -> connector  AUTH_CHALLENGE  {"v", "auth", "encryption", "nonce": Na}
    connector -> acceptor   AUTH_PROOF      {"proof": HMAC(token, "connector" | T)}
    acceptor  -> connector  AUTH_RESULT     {"ok": true, "proof": HMAC(token, "acceptor" | T)}
    both                    HELLO           (sealed, when encryption is on)

``T`` is the SHA-256 of the two first frames' payloads, so the proofs also authenticate both
sides' settings (a man in the middle cannot turn encryption off). The connector proves first: the
acceptor, which anyone who can reach its port may talk to, sends nothing derived from the token
before the connector's proof has verified, so probing a port yields nothing to guess the token
from offline. The connector sends its proof only to addresses it chose (the master, the peers the
master announced); against a man in the middle who captures it, the token's length (at least 128
bits, ``check_token``) is what makes offline guessing hopeless. Proofs are compared in constant
time.

Keys: HKDF-SHA256 over the token, salted with both nonces, with ``T`` in its info, gives one
AES-256-GCM key per direction (fresh per connection, since both nonces are); the connection then
seals every frame (``Connection.protect``, ``_aead``). With ``encryption=False`` on both ends (for
trusted networks) frames after the handshake are plain; the token proof stays. The two ends must
agree on the setting, or the handshake fails naming it. ``token=None`` on both ends means no
authentication and no protection at all (tests, single-host experiments).

Errors: a token mismatch raises ``AuthenticationError``; the framing errors (``ProtocolError``,
``PeerFailureError``, ``CommTimeoutError``) are those of ``_frames``; a short token is a
``ValueError``. After any of these the connection is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import socket
import string
import struct
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lowcomm.comm._aead import KEY_BYTES
from lowcomm.comm._frames import DEFAULT_MAX_FRAME_BYTES, HANDSHAKE_MAX_BYTES, Connection, Frame
from lowcomm.comm.errors import (
    AuthenticationError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
)
from lowcomm.comm.shaper import Shaper

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "KIND_AUTH_CHALLENGE",
    "KIND_AUTH_HELLO",
    "KIND_AUTH_PROOF",
    "KIND_AUTH_RESULT",
    "KIND_HELLO",
    "MIN_TOKEN_BITS",
    "PREAUTH_MAX_BYTES",
    "accept",
    "check_token",
    "connect",
    "normalize_token",
    "token_bits",
]

# The handshake's frame kinds (1-15 are reserved for it; see _frames).
KIND_AUTH_HELLO = 1
KIND_AUTH_CHALLENGE = 2
KIND_AUTH_PROOF = 3
KIND_AUTH_RESULT = 4
KIND_HELLO = 5

# The acceptor's whole handshake must finish within this (a few round trips of small frames): a
# connection that stays silent or trickles bytes holds a handshake slot for no longer.
DEFAULT_HANDSHAKE_TIMEOUT_S = 3.0
# Bound on every frame read before the other side has proved the token.
PREAUTH_MAX_BYTES = 1024
MIN_TOKEN_BITS = 128
_VERSION = 2
_NONCE_BYTES = 32
_CONNECTOR_LABEL = b"lowcomm-v2-connector\0"
_ACCEPTOR_LABEL = b"lowcomm-v2-acceptor\0"
_KEYS_LABEL = b"lowcomm-v2-frame-keys\0"
_LEN = struct.Struct("!I")

_HEX = frozenset(string.hexdigits.encode())
_BASE64 = frozenset((string.ascii_letters + string.digits + "+/-_=").encode())
_PRINTABLE = frozenset(range(0x21, 0x7F))
_HOW_TO_MAKE = "make one with `lowcomm token new` (or secrets.token_urlsafe(32))"


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def token_bits(token: bytes) -> float:
    """A conservative count of the bits of entropy ``token`` can hold: 4 per character of a hex
    string, 6 per character of a base64 / base64url string, 6.5 per character of other printable
    ASCII, 8 per byte otherwise; 0 for a token of fewer than 8 distinct bytes (``aaaa...``)."""
    if len(set(token)) < 8:
        return 0.0
    chars = set(token)
    if chars <= _HEX:
        return 4.0 * len(token)
    if chars <= _BASE64:
        return 6.0 * len(token.rstrip(b"="))
    if chars <= _PRINTABLE:
        return 6.5 * len(token)
    return 8.0 * len(token)


def check_token(token: bytes) -> None:
    """Raises ``ValueError`` unless ``token`` holds at least ``MIN_TOKEN_BITS`` by
    ``token_bits``' count: at least 32 hex characters, 22 base64 characters, 20 other printable
    characters or 16 random bytes."""
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise ValueError(
            f"the run token is too weak ({len(token)} bytes, about {bits:.0f} bits; at least "
            f"{MIN_TOKEN_BITS} are needed, e.g. 32 hex or 22 base64 characters): a short token "
            f"can be guessed offline from one captured handshake; {_HOW_TO_MAKE}"
        )


def normalize_token(token: bytes | str | None) -> bytes | None:
    """The run token as bytes (``None`` means no authentication).

    Raises:
        ValueError: an empty or weak token (``check_token``), or one of another type.
    """
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode()
    if not isinstance(token, bytes | bytearray) or len(token) == 0:
        raise ValueError(
            f"token must be a non-empty bytes or str, or None for no authentication; {_HOW_TO_MAKE}"
        )
    token = bytes(token)
    check_token(token)
    return token


def _mac(token: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(token, label + transcript, hashlib.sha256).digest()


def _transcript(first: bytes, second: bytes) -> bytes:
    h = hashlib.sha256()
    for part in (first, second):
        h.update(_LEN.pack(len(part)))
        h.update(part)
    return h.digest()


def _keys(token: bytes, nonce_c: bytes, nonce_a: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(connector-to-acceptor key, acceptor-to-connector key) of one connection."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_BYTES,
        salt=nonce_c + nonce_a,
        info=_KEYS_LABEL + transcript,
    ).derive(token)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]


def _configure(sock: socket.socket) -> None:
    sock.settimeout(None)  # blocking mode; deadlines are kernel timeouts (see _frames.send_all)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Kernel buffer sizes are left to TCP autotuning: fixing SO_SNDBUF/SO_RCVBUF disables it,
    # which halved loopback throughput here and would cap a long, fat WAN link.


def _recv(conn: Connection, deadline: float, kind: int, what: str, bound: int) -> tuple[Any, bytes]:
    """One handshake frame of ``kind``: its parsed JSON object and its raw payload."""
    frame: Frame = conn.recv_frame(timeout_s=_remaining(deadline), max_bytes=bound)
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
    return obj, frame.payload


def _hex_field(conn: Connection, obj: dict[str, Any], key: str, what: str) -> bytes:
    value = obj.get(key)
    try:
        if not isinstance(value, str) or len(value) != 2 * _NONCE_BYTES:
            raise ValueError
        return bytes.fromhex(value)
    except ValueError:
        conn.fail(f"bad {key!r} in {what}")
        raise ProtocolError(f"{conn.peer} sent a {what} without a valid {key!r} field") from None


def _check_version(conn: Connection, obj: dict[str, Any], what: str) -> None:
    if obj.get("v") != _VERSION:
        conn.fail(f"handshake version {obj.get('v')!r}")
        raise ProtocolError(
            f"{conn.peer} speaks lowcomm handshake version {obj.get('v')!r} in its {what}, this "
            f"process speaks {_VERSION}: run the same lowcomm version everywhere"
        )


def _encryption_mismatch(ours: bool, theirs: bool, other: str) -> str:
    return (
        f"encryption is {'on' if ours else 'off'} here and {'on' if theirs else 'off'} at {other}: "
        "set the same encryption setting everywhere (CommConfig(encryption=...), "
        "Master(encryption=...), `lowcomm master --no-encryption`)"
    )


def connect(
    address: tuple[str, int],
    *,
    token: bytes | str | None,
    hello: dict[str, Any],
    timeout_s: float = 10.0,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    shaper: Shaper | None = None,
    encryption: bool = True,
) -> tuple[Connection, dict[str, Any]]:
    """Opens a TCP connection to ``address``, authenticates both ways, derives the connection's
    keys and exchanges hellos (sealed unless ``encryption`` is False).

    Blocks up to ``timeout_s`` in total. Returns the connection and the acceptor's hello.

    Raises:
        AuthenticationError: the acceptor does not know our token (message starts with
            "run token rejected by"), only one side uses a token, or the two sides' encryption
            settings differ.
        PeerFailureError: nothing listens there, or the acceptor closed the connection.
        CommTimeoutError, ProtocolError: see the module docstring.
        ValueError: a weak token (``check_token``).
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
        return conn, _connect_handshake(conn, key, bool(encryption), hello, deadline)
    except BaseException:
        conn.close()
        raise


def _rejected(conn: Connection, result: dict[str, Any]) -> AuthenticationError:
    conn.close()
    reason = str(result.get("reason", "no reason given"))[:300]
    return AuthenticationError(f"run token rejected by {conn.peer}: {reason}")


def _connect_handshake(
    conn: Connection, key: bytes | None, encryption: bool, hello: dict[str, Any], deadline: float
) -> dict[str, Any]:
    def left() -> float:
        return max(_remaining(deadline), 1e-3)

    nonce_c = os.urandom(_NONCE_BYTES)
    first = {
        "v": _VERSION,
        "auth": key is not None,
        "encryption": encryption,
        "nonce": nonce_c.hex(),
    }
    first_raw = _dumps(first)
    conn.send_frame(KIND_AUTH_HELLO, first_raw, timeout_s=left())
    frame = conn.recv_frame(timeout_s=_remaining(deadline), max_bytes=PREAUTH_MAX_BYTES)
    if frame.kind == KIND_AUTH_RESULT:
        raise _rejected(conn, _as_object(conn, frame))
    if frame.kind != KIND_AUTH_CHALLENGE:
        conn.fail(f"unexpected frame kind {frame.kind} during handshake")
        raise ProtocolError(
            f"{conn.peer} sent frame kind {frame.kind} where the handshake expects an "
            f"authentication challenge (kind {KIND_AUTH_CHALLENGE}): not a lowcomm peer, or "
            "another protocol version"
        )
    challenge, challenge_raw = _as_object(conn, frame), frame.payload
    _check_version(conn, challenge, "authentication challenge")
    their_auth = challenge.get("auth") is True
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
        conn.send_json(KIND_HELLO, hello, timeout_s=left())
        their_hello, _ = _recv(conn, deadline, KIND_HELLO, "hello", HANDSHAKE_MAX_BYTES)
        return dict(their_hello)
    if (challenge.get("encryption") is True) != encryption:
        conn.close()
        raise AuthenticationError(
            f"handshake with {conn.peer} refused: "
            + _encryption_mismatch(encryption, challenge.get("encryption") is True, conn.peer)
        )
    nonce_a = _hex_field(conn, challenge, "nonce", "authentication challenge")
    transcript = _transcript(first_raw, challenge_raw)
    proof_c = _mac(key, _CONNECTOR_LABEL, transcript)
    conn.send_json(KIND_AUTH_PROOF, {"proof": proof_c.hex()}, timeout_s=left())
    result, _ = _recv(conn, deadline, KIND_AUTH_RESULT, "authentication result", PREAUTH_MAX_BYTES)
    if result.get("ok") is not True:
        raise _rejected(conn, result)
    proof_a = _hex_field(conn, result, "proof", "authentication result")
    if not hmac.compare_digest(proof_a, _mac(key, _ACCEPTOR_LABEL, transcript)):
        conn.fail("acceptor failed to prove the run token")
        raise AuthenticationError(
            f"run token rejected by {conn.peer}: it holds a different run token than this "
            "process (its HMAC proof did not verify); give every process the same token"
        )
    if encryption:
        c2a, a2c = _keys(key, nonce_c, nonce_a, transcript)
        conn.protect(tx_key=c2a, rx_key=a2c)
    conn.send_json(KIND_HELLO, hello, timeout_s=left())
    their_hello, _ = _recv(conn, deadline, KIND_HELLO, "hello", HANDSHAKE_MAX_BYTES)
    return dict(their_hello)


def accept(
    sock: socket.socket,
    *,
    token: bytes | str | None,
    hello: dict[str, Any],
    timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    shaper: Shaper | None = None,
    encryption: bool = True,
) -> tuple[Connection, dict[str, Any]]:
    """Runs the acceptor's side of the handshake on a freshly accepted socket (takes ownership of
    it: closed on any failure). Blocks up to ``timeout_s``. Returns the connection (protected
    unless ``encryption`` is False) and the connector's hello.

    Until the connector has proved the token the connection is ``quiet`` (its failures log at
    DEBUG): the caller logs a refused connection, once per source.

    Raises:
        AuthenticationError: the connector failed to prove the token, or its encryption setting
            differs (it was told why).
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
    conn.quiet = True
    try:
        return conn, _accept_handshake(conn, key, bool(encryption), hello, deadline)
    except BaseException:
        conn.close()
        raise


def _accept_handshake(
    conn: Connection, key: bytes | None, encryption: bool, hello: dict[str, Any], deadline: float
) -> dict[str, Any]:
    def left() -> float:
        return max(_remaining(deadline), 1e-3)

    def reject(reason: str) -> AuthenticationError:
        # The connector may already be gone; the rejection stands either way.
        with contextlib.suppress(CommTimeoutError, PeerFailureError):
            conn.send_json(KIND_AUTH_RESULT, {"ok": False, "reason": reason}, timeout_s=left())
        conn.fail(f"authentication failed: {reason}")
        return AuthenticationError(f"connection from {conn.peer} refused: {reason}")

    first, first_raw = _recv(
        conn, deadline, KIND_AUTH_HELLO, "authentication hello", PREAUTH_MAX_BYTES
    )
    _check_version(conn, first, "authentication hello")
    their_auth = first.get("auth") is True
    nonce_c = _hex_field(conn, first, "nonce", "authentication hello")
    if key is None:
        # The connector decides whether talking to an unauthenticated acceptor is acceptable.
        conn.send_json(KIND_AUTH_CHALLENGE, {"v": _VERSION, "auth": False}, timeout_s=left())
        their_hello, _ = _recv(conn, deadline, KIND_HELLO, "hello", HANDSHAKE_MAX_BYTES)
        conn.quiet = False
        conn.send_json(KIND_HELLO, hello, timeout_s=left())
        return dict(their_hello)
    if not their_auth:
        raise reject("this process requires a run token and the connecting one has none")
    if (first.get("encryption") is True) != encryption:
        raise reject(
            _encryption_mismatch(first.get("encryption") is True, encryption, "the acceptor")
        )
    nonce_a = os.urandom(_NONCE_BYTES)
    challenge_raw = _dumps(
        {"v": _VERSION, "auth": True, "encryption": encryption, "nonce": nonce_a.hex()}
    )
    conn.send_frame(KIND_AUTH_CHALLENGE, challenge_raw, timeout_s=left())
    proof, _ = _recv(conn, deadline, KIND_AUTH_PROOF, "authentication proof", PREAUTH_MAX_BYTES)
    proof_c = _hex_field(conn, proof, "proof", "authentication proof")
    transcript = _transcript(first_raw, challenge_raw)
    if not hmac.compare_digest(proof_c, _mac(key, _CONNECTOR_LABEL, transcript)):
        raise reject("wrong run token (HMAC proof did not verify)")
    # Only now, with the connector's proof verified, does anything derived from the token leave.
    conn.quiet = False
    proof_a = _mac(key, _ACCEPTOR_LABEL, transcript)
    conn.send_json(KIND_AUTH_RESULT, {"ok": True, "proof": proof_a.hex()}, timeout_s=left())
    if encryption:
        c2a, a2c = _keys(key, nonce_c, nonce_a, transcript)
        conn.protect(tx_key=a2c, rx_key=c2a)
    their_hello, _ = _recv(conn, deadline, KIND_HELLO, "hello", HANDSHAKE_MAX_BYTES)
    conn.send_json(KIND_HELLO, hello, timeout_s=left())
    return dict(their_hello)


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _as_object(conn: Connection, frame: Frame) -> dict[str, Any]:
    obj = conn.parse_json(frame.payload)
    if not isinstance(obj, dict):
        conn.fail("handshake payload is not an object")
        raise ProtocolError(f"{conn.peer} sent a malformed handshake frame")
    return obj
