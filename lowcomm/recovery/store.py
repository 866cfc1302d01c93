"""Where the pipeline runtime keeps each stage's checkpoints: a directory, one file per stage.

The stand-in for a level off the stage's own host (a shared or remote filesystem): a replacement
peer reads the lost stage's newest checkpoint from it. Each save is written to a temporary file,
fsynced and renamed into place, so a reader sees the old checkpoint or the new one, never a torn
one. Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["StageStore"]


class StageStore:
    """Stage checkpoints under ``root`` (``stage<i>.pt``: step, parameters, optimizer state)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, stage: int, replica: int) -> Path:
        return self.root / (f"stage{stage}.pt" if replica == 0 else f"stage{stage}r{replica}.pt")

    def save(self, stage: int, *, step: int, params: Any, optimizer: Any, replica: int = 0) -> int:
        """Replaces stage ``stage``'s checkpoint (of pipeline replica ``replica``) with the state
        after ``step`` steps; its bytes."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(stage, replica)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save({"step": step, "params": params, "optimizer": optimizer}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path.stat().st_size

    def load(self, stage: int, *, replica: int = 0) -> dict[str, Any] | None:
        """Stage ``stage``'s newest checkpoint (``step``, ``params``, ``optimizer``), or None."""
        path = self._path(stage, replica)
        if not path.exists():
            return None
        with open(path, "rb") as f:
            obj: dict[str, Any] = torch.load(f, weights_only=True)
        return obj
