"""The wire's security: who proves the token first, weak tokens, protected frames, tampering on
the path (a relay that flips one byte), replay / reorder / drop, and the encryption setting."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from lowcomm.comm import Communicator, Master, PeerListener, _frames, _handshake
from lowcomm.comm.errors import AuthenticationError, CommError, ProtocolError
from lowcomm.launch import cli
from tests._raw_socket import read_exact
from tests._tokens import OTHER_TOKEN, TOKEN
from tests.comm._control_harness import FAST, addr, communicator, run_threads

pytestmark = pytest.mark.timeout(60)


# ----- helpers -------------------------------------------------------------------------------------
def _raw_frame(kind: int, payload: bytes) -> bytes:
    return _frames.HEADER.pack(b"LCMW", 1, kind, 0, 0, 0, len(payload)) + payload


def _read_raw_frame(sock: socket.socket, *, tag_bytes: int = 0) -> bytes:
    """One whole frame as bytes (header, payload and, when sealed, its tag)."""
    header = read_exact(sock, _frames.HEADER.size)
    length = _frames.HEADER.unpack(header)[-1]
    return header + read_exact(sock, length + tag_bytes)


@contextlib.contextmanager
def _server() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def _pair(server: socket.socket, **kw: Any) -> tuple[_frames.Connection, _frames.Connection]:
    box: dict[str, Any] = {}

    def acc() -> None:
        client, _ = server.accept()
        box["conn"] = _handshake.accept(client, token=TOKEN, hello={}, timeout_s=10, **kw)[0]

    t = threading.Thread(target=acc, daemon=True)
    t.start()
    conn, _ = _handshake.connect(server.getsockname(), token=TOKEN, hello={}, timeout_s=10, **kw)
    t.join(10)
    return conn, box["conn"]


class Relay:
    """A TCP relay on loopback between a client and ``target``, with no token: it passes the
    handshake through untouched and applies ``tamper(data, offset)`` to the client-to-target
    stream (``offset``: bytes of that stream already forwarded). Records both streams."""

    def __init__(
        self,
        target: tuple[str, int],
        tamper: Callable[[bytes, int], bytes] = lambda d, o: d,
    ) -> None:
        self.target = target
        self.tamper = tamper
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.upstream = bytearray()
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        offset = 0
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if up:
                    data = self.tamper(data, offset)
                    self.upstream += data
                offset += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def flip_at(position: int) -> Callable[[bytes, int], bytes]:
    """A tamper function flipping one bit of the byte at ``position`` of the stream."""

    def tamper(data: bytes, offset: int) -> bytes:
        if offset <= position < offset + len(data):
            buf = bytearray(data)
            buf[position - offset] ^= 0x01
            return bytes(buf)
        return data

    return tamper


# ----- the token proof ------------------------------------------------------------------------------
def test_the_acceptor_reveals_nothing_derived_from_the_token_before_the_connector_proves_it() -> (
    None
):
    # Today's acceptor answered the first hello with an HMAC of the token over the stranger's
    # nonce: enough to guess the token offline. Now the challenge holds settings and a nonce only,
    # and a wrong proof gets a bare refusal.
    listener = PeerListener("127.0.0.1", 0, token=TOKEN)
    try:
        with socket.create_connection(listener.address, timeout=5) as raw:
            hello = {"v": 2, "auth": True, "encryption": True, "nonce": os.urandom(32).hex()}
            raw.sendall(_raw_frame(_handshake.KIND_AUTH_HELLO, json.dumps(hello).encode()))
            challenge_frame = _read_raw_frame(raw)
            assert challenge_frame[5] == _handshake.KIND_AUTH_CHALLENGE
            challenge = json.loads(challenge_frame[_frames.HEADER.size :])
            assert set(challenge) == {"v", "auth", "encryption", "nonce"}
            raw.sendall(
                _raw_frame(_handshake.KIND_AUTH_PROOF, json.dumps({"proof": "00" * 32}).encode())
            )
            result = json.loads(_read_raw_frame(raw)[_frames.HEADER.size :])
            assert result["ok"] is False and "proof" not in result
            assert raw.recv(10) == b""  # and then the connection is closed
    finally:
        listener.close()


def test_a_connector_refuses_an_acceptor_whose_proof_does_not_verify() -> None:
    # A fake acceptor that accepts any proof but cannot make its own: the connector gives up
    # before sending anything else (its hello never leaves).
    with _server() as server:

        def fake() -> bytes:
            client, _ = server.accept()
            with client:
                _read_raw_frame(client)
                challenge = {"v": 2, "auth": True, "encryption": True, "nonce": "11" * 32}
                client.sendall(
                    _raw_frame(_handshake.KIND_AUTH_CHALLENGE, json.dumps(challenge).encode())
                )
                _read_raw_frame(client)
                ok = {"ok": True, "proof": "22" * 32}
                client.sendall(_raw_frame(_handshake.KIND_AUTH_RESULT, json.dumps(ok).encode()))
                client.settimeout(5)
                return client.recv(100)

        box: dict[str, bytes] = {}
        t = threading.Thread(target=lambda: box.update(rest=fake()), daemon=True)
        t.start()
        with pytest.raises(AuthenticationError, match="different run token"):
            _handshake.connect(server.getsockname(), token=TOKEN, hello={"secret": 1}, timeout_s=5)
        t.join(5)
        assert box["rest"] == b""  # closed: no hello reached the impostor


@pytest.mark.parametrize(
    "weak", [b"test-token", b"volunteer-secret", "0123456789abcdef0123", b"a" * 64, b"\x00" * 16]
)
def test_weak_tokens_are_refused_with_a_message_saying_how_to_make_one(weak: bytes | str) -> None:
    with pytest.raises(ValueError, match="lowcomm token new"):
        _handshake.normalize_token(weak)
    with pytest.raises(ValueError, match="lowcomm token new"):
        Master(("127.0.0.1", 0), token=weak)
    with pytest.raises(ValueError, match="lowcomm token new"):
        PeerListener("127.0.0.1", 0, token=weak)
    with pytest.raises(ValueError, match="lowcomm token new"):
        Communicator("127.0.0.1:1", token=weak)


@pytest.mark.parametrize(
    "good",
    [
        secrets.token_hex(16),  # 32 hex characters
        secrets.token_urlsafe(16),  # 22 base64url characters
        secrets.token_bytes(16),  # 16 random bytes
        TOKEN,
    ],
)
def test_tokens_of_128_bits_are_accepted(good: bytes | str) -> None:
    assert _handshake.normalize_token(good) is not None


def test_lowcomm_token_new_prints_a_fresh_strong_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "new"]) == 0
    assert cli.main(["token", "new"]) == 0
    first, second = capsys.readouterr().out.split()
    assert first != second
    assert _handshake.token_bits(first.encode()) >= 256
    _handshake.check_token(first.encode())


# ----- protected frames ------------------------------------------------------------------------------
def test_frames_after_the_handshake_are_encrypted_unless_encryption_is_off() -> None:
    secret = b"the plaintext that must not be seen on the wire" * 4
    for encryption in (True, False):
        with _server() as server:
            relay = Relay(server.getsockname())
            conn, peer = _pair_via(server, relay, encryption=encryption)
            conn.send_frame(70, secret, timeout_s=5)
            assert peer.recv_frame(timeout_s=5).payload == secret
            conn.send_json(71, {"peer_group": 3}, timeout_s=5)
            assert peer.recv_json(timeout_s=5)[2] == {"peer_group": 3}
            assert (secret in relay.upstream) is not encryption
            assert conn.protected is encryption and peer.protected is encryption
            conn.close()
            peer.close()
            relay.close()


def _pair_via(
    server: socket.socket, relay: Relay, **kw: Any
) -> tuple[_frames.Connection, _frames.Connection]:
    box: dict[str, Any] = {}

    def acc() -> None:
        client, _ = server.accept()
        box["conn"] = _handshake.accept(client, token=TOKEN, hello={}, timeout_s=10, **kw)[0]

    t = threading.Thread(target=acc, daemon=True)
    t.start()
    conn, _ = _handshake.connect(relay.address, token=TOKEN, hello={}, timeout_s=10, **kw)
    t.join(10)
    return conn, box["conn"]


@pytest.mark.parametrize("where", ["header", "ciphertext", "auth-tag"])
def test_a_frame_modified_on_the_path_fails_authentication(where: str) -> None:
    with _server() as server:
        conn, peer = _pair(server)
        # Capture the sealed frame as it leaves, then deliver a modified copy.
        conn.send_frame(70, b"x" * 1000, tag=7, timeout_s=5)
        raw = bytearray(_read_raw_frame(peer._sock, tag_bytes=16))
        position = {"header": 16, "ciphertext": 28 + 500, "auth-tag": len(raw) - 1}[where]
        raw[position] ^= 0x01
        conn._sock.sendall(raw)
        with pytest.raises(ProtocolError, match="failed authentication"):
            peer.recv_frame(timeout_s=5)
        assert peer.closed
        conn.close()


@pytest.mark.parametrize("attack", ["replay", "reorder", "drop"])
def test_replayed_reordered_or_dropped_frames_fail_authentication(attack: str) -> None:
    with _server() as server:
        conn, peer = _pair(server)
        conn.send_frame(70, b"first", timeout_s=5)
        conn.send_frame(70, b"second", timeout_s=5)
        first = _read_raw_frame(peer._sock, tag_bytes=16)
        second = _read_raw_frame(peer._sock, tag_bytes=16)
        delivered = {
            "replay": [first, first],
            "reorder": [second, first],
            "drop": [second],
        }[attack]
        conn._sock.sendall(b"".join(delivered))
        if attack == "replay":
            assert peer.recv_frame(timeout_s=5).payload == b"first"
        with pytest.raises(ProtocolError, match="failed authentication"):
            peer.recv_frame(timeout_s=5)
        conn.close()


def test_an_unsealed_frame_injected_into_a_protected_connection_is_refused() -> None:
    with _server() as server:
        conn, peer = _pair(server)
        conn._sock.sendall(_raw_frame(70, b"injected"))
        with pytest.raises(ProtocolError, match="unsealed frame"):
            peer.recv_frame(timeout_s=5)
        conn.close()


def test_bulk_receive_paths_open_sealed_frames_into_the_callers_buffer() -> None:
    with _server() as server:
        conn, peer = _pair(server)
        data = torch.arange(300_000, dtype=torch.float32)
        parts = [memoryview(data.numpy()).cast("B"), b"tail"]
        conn.send_frame(80, parts, seq=3, timeout_s=5)
        out = bytearray(data.numel() * 4 + 4)
        header = peer.recv_frame_into(out, timeout_s=5, lowat=1 << 20)
        assert header.seq == 3 and bytes(out) == data.numpy().tobytes() + b"tail"
        conn.send_frame(81, b"y" * 5000, timeout_s=5)
        header = peer.recv_header(timeout_s=5)
        buf = bytearray(header.length)
        peer.recv_into(buf, timeout_s=5)
        assert buf == b"y" * 5000
        conn.close()
        peer.close()


@pytest.mark.parametrize("connector_encrypts", [True, False])
def test_an_encryption_mismatch_fails_the_handshake_naming_the_setting(
    connector_encrypts: bool,
) -> None:
    listener = PeerListener("127.0.0.1", 0, token=TOKEN, encryption=not connector_encrypts)
    try:
        with pytest.raises(AuthenticationError, match=r"encryption is (on|off) .*encryption="):
            _handshake.connect(
                listener.address,
                token=TOKEN,
                hello={"purpose": "p", "key": "k"},
                timeout_s=5,
                encryption=connector_encrypts,
            )
    finally:
        listener.close()


def test_a_wrong_token_is_still_refused_with_encryption_off() -> None:
    listener = PeerListener("127.0.0.1", 0, token=TOKEN, encryption=False)
    try:
        with pytest.raises(AuthenticationError, match="run token rejected"):
            _handshake.connect(
                listener.address, token=OTHER_TOKEN, hello={}, timeout_s=5, encryption=False
            )
    finally:
        listener.close()


# ----- tampering in a run: nobody applies it -----------------------------------------------------------
def test_one_byte_flipped_by_a_relay_fails_the_all_reduce_on_every_peer_and_nobody_applies_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Today a relay without the token passed the handshake through, changed one value, and both
    # peers committed the same wrong sum. Peer b advertises the relay, so a's ring connections
    # to b run through it; it flips one byte well past the handshake, inside the all-reduce data.
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=5.0).start()
    relays: list[Relay] = []
    try:
        a, b = communicator(addr(master)), communicator(addr(master))

        def through_relay() -> tuple[str, int]:
            assert b._listener is not None
            if not relays:
                relays.append(Relay(b._listener.address, flip_at(200_000)))
            host, port = relays[0].address[:2]
            return str(host), int(port)

        monkeypatch.setattr(b, "_advertised", through_relay)
        a.connect(timeout_s=30)

        def admit() -> None:
            while a.world_size < 2:
                a.update_topology(timeout_s=30)

        assert run_threads([lambda: b.connect(timeout_s=30), admit]) == [None, None]
        relay = relays[0]
        tensors = [torch.full((1 << 20,), float(i + 1)) for i in range(2)]
        before = [t.clone() for t in tensors]
        results = run_threads(
            [
                lambda: a.all_reduce(tensors[0], "sum", timeout_s=20),
                lambda: b.all_reduce(tensors[1], "sum", timeout_s=20),
            ]
        )
        assert len(relay.upstream) > 200_000, ("the relay never carried the all-reduce", results)
        assert all(isinstance(r, CommError) for r in results), results
        for t, t0 in zip(tensors, before, strict=True):
            assert torch.equal(t, t0), "a peer applied a tampered result"
        for c in (a, b):
            c.close()
    finally:
        for r in relays:
            r.close()
        master.stop()


# ----- bounded parsing before authentication ---------------------------------------------------------
@pytest.mark.parametrize("depth", [900, 60_000])
def test_deeply_nested_json_before_authentication_is_a_clean_counted_rejection_logged_once(
    depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    # 60,000 '[' raised RecursionError in the master's thread (a traceback per connection).
    master = Master(("127.0.0.1", 0), token=TOKEN).start()
    try:
        caplog.set_level(logging.DEBUG, logger="lowcomm")
        for _ in range(3):
            with socket.create_connection(master.address, timeout=5) as raw:
                raw.sendall(_raw_frame(_handshake.KIND_AUTH_HELLO, b"[" * depth))
                raw.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert raw.recv(100) == b""
        deadline = 50
        while master.snapshot()["num_rejected_connections"] < 3 and deadline:
            threading.Event().wait(0.1)
            deadline -= 1
        assert master.snapshot()["num_rejected_connections"] == 3
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "127.0.0.1" in warnings[0].getMessage()
        assert all(r.exc_info is None for r in caplog.records)
        assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
        # and the master still serves the run
        c = Communicator(addr(master), token=TOKEN, config=FAST)
        c.connect(timeout_s=10)
        c.close()
    finally:
        master.stop()


def test_bounded_json_parser_refuses_depth_but_not_brackets_inside_strings() -> None:
    with pytest.raises(ValueError, match="nested deeper"):
        _frames.parse_json_bounded(b"[" * 33 + b"]" * 33)
    assert _frames.parse_json_bounded(json.dumps({"s": "[" * 1000}).encode()) == {"s": "[" * 1000}
    nested: Any = 1
    for _ in range(32):
        nested = [nested]
    assert _frames.parse_json_bounded(json.dumps(nested).encode()) == nested
