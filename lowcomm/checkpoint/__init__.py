"""Lazy asynchronous multi-level checkpointing: host memory, local disk, remote storage.

Two lines in a training loop (see ``Checkpointer``)::

    ckpt = Checkpointer(CheckpointConfig(levels=("host://", "/ckpt/run1", "s3://bucket/run1")))
    ...
    ckpt.wait_until_safe_to_mutate()          # right before optimizer.step()
    optimizer.step()
    ckpt.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict()})  # returns at once
    ...
    state = ckpt.restore()                    # newest verified checkpoint, any level
"""

from __future__ import annotations

from lowcomm.checkpoint.checkpointer import Checkpointer, CheckpointInfo, RestoreReport
from lowcomm.checkpoint.config import CheckpointConfig
from lowcomm.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointWriteError,
    NoCheckpointError,
)
from lowcomm.checkpoint.handle import SaveHandle
from lowcomm.checkpoint.levels import StorageLevel

__all__ = [
    "CheckpointConfig",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointTimeoutError",
    "CheckpointWriteError",
    "Checkpointer",
    "NoCheckpointError",
    "RestoreReport",
    "SaveHandle",
    "StorageLevel",
]
