"""Reading a raw socket in tests that look at (or forge) the bytes on the wire."""

from __future__ import annotations

import socket


def read_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; fails the test if the peer closes first."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed"
        out += chunk
    return out
