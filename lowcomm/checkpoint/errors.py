"""Errors raised by lowcomm.checkpoint; all derive from ``LowcommError``."""

from __future__ import annotations

from lowcomm.errors import LowcommError, LowcommTimeoutError

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointTimeoutError",
    "CheckpointWriteError",
    "NoCheckpointError",
]


class CheckpointError(LowcommError):
    """Base class of every checkpointing failure."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint to one level failed (disk full, permission denied, remote unreachable).

    Training can continue: the failed level's checkpoint for that step is not committed, and every
    checkpoint committed before it is untouched. ``step`` and ``level`` say which one failed.
    """

    def __init__(self, message: str, *, step: int, level: str) -> None:
        super().__init__(message)
        self.step = step
        self.level = level


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint failed verification (checksum, size or manifest mismatch)."""


class NoCheckpointError(CheckpointError):
    """No level holds a complete, verified checkpoint to restore (the reasons are in the message)."""


class CheckpointTimeoutError(CheckpointError, LowcommTimeoutError):
    """A blocking checkpoint call ran past its ``timeout_s``."""
