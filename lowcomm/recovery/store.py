"""Where the pipeline runtime keeps each stage's checkpoints: a directory, one file per stage.

The stand-in for a level off the stage's own host (a shared or remote filesystem): a replacement
peer reads the lost stage's newest checkpoint from it. Each save is written to a temporary file,
fsynced and renamed into place, so a reader sees the old checkpoint or the new one, never a torn
one. Loading uses ``weights_only=True``.

The newest ``keep`` checkpoints of each stage also stay by their step (``stage<i>.step<n>.pt``,
hard links of the newest file, so no extra bytes are written; copies where links fail): a
pipeline that rolls every stage back (``PipelineConfig.on_loss="rollback"``) needs the newest step
that *every* stage has, and a stage killed between a commit and its save holds one checkpoint
fewer than the others.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["StageStore"]


class StageStore:
    """Stage checkpoints under ``root`` (``stage<i>.pt``: step, parameters, optimizer state), and
    the newest ``keep`` of each by step."""

    def __init__(self, root: str | os.PathLike[str], *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"StageStore.keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def _name(self, stage: int, replica: int) -> str:
        return f"stage{stage}" if replica == 0 else f"stage{stage}r{replica}"

    def _path(self, stage: int, replica: int, step: int | None = None) -> Path:
        name = self._name(stage, replica)
        return self.root / (f"{name}.pt" if step is None else f"{name}.step{step}.pt")

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
        link = path.with_suffix(f".lnk{os.getpid()}")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # a filesystem without hard links: a copy
            shutil.copyfile(path, link)
        os.replace(link, self._path(stage, replica, step))
        for old in self.steps(stage, replica=replica)[: -self.keep]:
            self._path(stage, replica, old).unlink(missing_ok=True)
        return path.stat().st_size

    def steps(self, stage: int, *, replica: int = 0) -> list[int]:
        """The steps of stage ``stage``'s kept checkpoints, oldest first."""
        pattern = re.compile(re.escape(self._name(stage, replica)) + r"\.step(\d+)\.pt")
        if not self.root.is_dir():
            return []
        found = (pattern.fullmatch(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def common_step(self, stages: Iterable[int], *, replica: int = 0) -> int | None:
        """The newest step that every stage of ``stages`` has a checkpoint of (None: none)."""
        common: set[int] | None = None
        for s in stages:
            have = set(self.steps(s, replica=replica))
            common = have if common is None else common & have
        return max(common) if common else None

    def load(
        self, stage: int, *, replica: int = 0, step: int | None = None
    ) -> dict[str, Any] | None:
        """Stage ``stage``'s newest checkpoint (``step``, ``params``, ``optimizer``, and the file's
        ``bytes``), or the one of ``step``; None if there is none."""
        path = self._path(stage, replica, step)
        if not path.exists():
            return None
        with open(path, "rb") as f:
            obj: dict[str, Any] = torch.load(f, weights_only=True)
        obj["bytes"] = path.stat().st_size
        return obj
