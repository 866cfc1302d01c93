"""The error a codec raises when a serialised payload cannot be trusted."""

from __future__ import annotations

from lowcomm.errors import LowcommError

__all__ = ["CodecError"]


class CodecError(LowcommError, ValueError):
    """A serialised ``Encoded`` (or zstd container) is truncated, corrupt or not ours.

    It is a ``ValueError`` too, because the cause is bad input; catch it and drop the payload (ask
    the sender again) rather than decoding anything from it.
    """
