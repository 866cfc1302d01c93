"""The per-direction AEAD state of a protected connection: key, frame counter, reused buffers.

After the handshake (``_handshake``) every frame's payload is sealed with AES-256-GCM (from the
``cryptography`` package). On the wire a sealed frame is the 28-byte header (flags bit
``FLAG_SEALED`` set, ``length`` = the plaintext length), the ciphertext, and a 16-byte tag; the
header is the associated data, so it is authenticated too. The 96-bit nonce is the direction's
frame counter (a fresh key per connection and direction, so a nonce is never reused), which makes a
replayed, reordered or dropped frame fail authentication like a modified one.

Why AES-GCM: on 4 MiB frames here it seals at about 6.3 GB/s and opens at 4.4 GB/s, against
2.4 GB/s both ways for ChaCha20-Poly1305 (x86 with AES-NI; ``cryptography`` 50); both release the
GIL during the call. ``encrypt_into`` / ``decrypt_into`` write straight into the caller's buffers:
a sealed frame costs one pass over the data on each side and no Python-level copy.

Thread safety: one ``FrameCipher`` per direction; the ``Connection`` serialises its senders (and
its receivers), so each is used by one thread at a time.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lowcomm.comm.errors import ProtocolError

__all__ = ["FLAG_SEALED", "KEY_BYTES", "TAG_BYTES", "FrameCipher"]

FLAG_SEALED = 0x1
KEY_BYTES = 32
TAG_BYTES = 16
_NONCE = struct.Struct("!IQ")  # 4 zero bytes, then the 64-bit frame counter
# Frames up to this size reuse the direction's buffer; larger ones (rare: shared-state chunks can
# reach the frame bound) get a fresh one, so that an idle connection does not pin hundreds of MiB.
_REUSE_BYTES = 16 * 1024 * 1024


class FrameCipher:
    """Seals (or opens) the frames of one direction of one connection, in order."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an AEAD key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._counter = 0
        self._buf = bytearray()

    def _nonce(self) -> bytes:
        nonce = _NONCE.pack(0, self._counter)
        self._counter += 1
        return nonce

    def buffer(self, nbytes: int) -> memoryview:
        """A scratch buffer of ``nbytes`` (ciphertext and tag), reused between frames."""
        if nbytes > _REUSE_BYTES:
            return memoryview(bytearray(nbytes))
        if len(self._buf) < nbytes:
            self._buf = bytearray(nbytes)
        return memoryview(self._buf)[:nbytes]

    def seal(self, header: bytes, views: list[memoryview], length: int) -> memoryview:
        """The ciphertext and tag of the payload ``views`` (``length`` bytes in all), with
        ``header`` as associated data. Valid until the next call."""
        out = self.buffer(length + TAG_BYTES)
        if len(views) == 1:
            data: memoryview = views[0]
        else:  # the AEAD takes one contiguous input: gather the parts, then seal in place
            pos = 0
            for v in views:
                out[pos : pos + v.nbytes] = v
                pos += v.nbytes
            data = out[:length]
        self._aead.encrypt_into(self._nonce(), data, header, out)
        return out

    def open_into(self, header: bytes, sealed: memoryview, out: memoryview, *, peer: str) -> None:
        """Verifies ``sealed`` (ciphertext and tag) against ``header`` and writes the plaintext
        into ``out``. On failure ``out`` may hold unverified bytes: the caller must discard it.

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
