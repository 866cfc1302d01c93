"""The per-direction AEAD state of a protected connection: key, frame counter, reused buffers.

After the handshake (``_handshake``) every frame's payload is sealed with AES-256-GCM (from the
``cryptography`` package). On the wire a sealed frame is the 28-byte header (flags bit
``FLAG_SEALED`` set, ``length`` = the plaintext length), then the payload cut into records of
``RECORD_BYTES`` (the last one shorter; a payload of at most ``RECORD_BYTES``, which is every
control frame, is one record), each record its ciphertext followed by its 16-byte tag. Every
record is sealed on its own with the header as associated data, so the header is authenticated
too. The 96-bit nonce is the direction's record counter (a fresh key per connection and direction,
so a nonce is never reused), which makes a replayed, reordered, dropped or truncated record fail
authentication like a modified one.

Why records: a connection seals the next records on a helper thread while its own thread writes
record k to the socket, and opens record k while the next ones arrive (``_cipher_thread``; up to
``RECORD_SLOTS`` records of a frame in flight, each in its own reused buffer), so the cipher
overlaps the wire instead of adding to it, and the next hop of a ring starts one record after the
last byte, not one frame. Measured here (2-peer ring, 64 MiB fp32, loopback, interleaved, busy
host): a 4 MiB sub-chunk sealed whole then sent ran at 0.52-0.58x the unprotected ring, 1 MiB
records overlapped at 0.73-0.75x; 256 KiB records cost more in thread hand-offs than they gained,
and records without the helper thread were slower than whole frames. The hand-offs cost CPU
(19-25% more per op than whole frames, on that busy host), mostly in thread wake-ups and GIL
hand-offs: with two buffer slots the two threads met once per record (a 2-peer run of the public
call made 15 futex calls per record); with ``RECORD_SLOTS`` = 4 a 4 MiB sub-chunk's records are
queued on the helper at once and run back to back (10 per record), which took the public call's
CPU per op from 0.547x to 0.575x of the unprotected call's (2 cores, medians of 7 interleaved
runs). Without the helper at all (``connect_ring(overlap_cipher=False)``) the CPU is lower still,
but the wall clock on 2 cores was about twice as long: the cipher then stalls the socket.

Why AES-GCM: it is the fastest AEAD ``cryptography`` offers here (x86 with VAES/AVX-512;
``cryptography`` 50 with OpenSSL 4.0: AES-GCM 7-12 GB/s, AES-OCB3 2.8, ChaCha20-Poly1305 1.6);
it releases the GIL during the call, so other threads run meanwhile. ``encrypt_into`` /
``decrypt_into`` write straight into the caller's buffers: no Python-level copy.

Thread safety: one ``FrameCipher`` per direction; the ``Connection`` serialises its senders (and
its receivers), so each is used by one thread at a time.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lowcomm.comm.errors import ProtocolError

__all__ = [
    "FLAG_SEALED",
    "KEY_BYTES",
    "RECORD_BYTES",
    "RECORD_SLOTS",
    "TAG_BYTES",
    "FrameCipher",
    "records",
    "sealed_length",
]

FLAG_SEALED = 0x1
KEY_BYTES = 32
TAG_BYTES = 16
_NONCE = struct.Struct("!IQ")  # 4 zero bytes, then the 64-bit record counter
# Large enough that a hand-off to the helper thread (tens of microseconds) is small against its
# AES-GCM (about 0.1 ms), small enough that a 4 MiB ring sub-chunk is a pipeline of four.
RECORD_BYTES = 1024 * 1024
# How many records of a frame a direction seals (or opens) ahead of the socket: one 4 MiB ring
# sub-chunk, so the connection's thread and the helper meet about once per frame.
RECORD_SLOTS = 4


def records(length: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte ranges of the records of a payload of ``length`` bytes (one empty
    record for an empty payload: its tag alone authenticates the header)."""
    if length <= RECORD_BYTES:
        return [(0, length)]
    return [(a, min(a + RECORD_BYTES, length)) for a in range(0, length, RECORD_BYTES)]


def sealed_length(length: int) -> int:
    """How many payload bytes a sealed frame of ``length`` plaintext bytes puts on the wire."""
    return length + TAG_BYTES * max(1, -(-length // RECORD_BYTES))


class FrameCipher:
    """Seals (or opens) the frames of one direction of one connection, in order."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an AEAD key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._counter = 0
        self._bufs = [bytearray() for _ in range(RECORD_SLOTS)]

    def _nonce(self) -> bytes:
        nonce = _NONCE.pack(0, self._counter)
        self._counter += 1
        return nonce

    def buffer(self, slot: int = 0) -> memoryview:
        """Record buffer ``slot`` (0 to ``RECORD_SLOTS - 1``: records are sealed or opened in
        some while others are on the socket) of the direction, room for one record's ciphertext
        and tag; allocated on first use, then reused."""
        if len(self._bufs[slot]) < RECORD_BYTES + TAG_BYTES:
            self._bufs[slot] = bytearray(RECORD_BYTES + TAG_BYTES)
        return memoryview(self._bufs[slot])

    def seal(
        self, header: bytes, views: list[memoryview], start: int, end: int, *, slot: int = 0
    ) -> memoryview:
        """The ciphertext and tag of bytes ``start:end`` of the payload ``views`` (one record),
        with ``header`` as associated data, in buffer ``slot``. Valid until that slot's next
        use. Records must be sealed in the order they are sent (the nonce is a counter)."""
        out = self.buffer(slot)[: end - start + TAG_BYTES]
        data: memoryview | None = None
        pos = 0
        for v in views:  # the record's bytes: a slice of one view, or gathered from several
            if pos <= start and end <= pos + v.nbytes:
                data = v[start - pos : end - pos]
                break
            pos += v.nbytes
        if data is None:
            pos = filled = 0
            for v in views:
                lo, hi = max(start - pos, 0), min(end - pos, v.nbytes)
                if lo < hi:
                    out[filled : filled + hi - lo] = v[lo:hi]
                    filled += hi - lo
                pos += v.nbytes
            data = out[: end - start]
        self._aead.encrypt_into(self._nonce(), data, header, out)
        return out

    def open_into(self, header: bytes, sealed: memoryview, out: memoryview, *, peer: str) -> None:
        """Verifies ``sealed`` (one record's ciphertext and tag) against ``header`` and writes the
        plaintext into ``out``. On failure ``out`` may hold unverified bytes: the caller must
        discard it.

        Raises:
            ProtocolError: the frame was modified, replayed, reordered or dropped on the path
                (or the two ends hold different keys).
        """
        try:
            self._aead.decrypt_into(self._nonce(), sealed, header, out)
        except InvalidTag:
            raise ProtocolError(
                f"a frame from {peer} failed authentication (modified, replayed, reordered or "
                "dropped on the path); the connection is closed and the operation fails"
            ) from None
