"""A volunteer's training state: its own local checkpoint, and the run's outer state on the remote.

``open_trainer`` is the one seam between ``lowcomm join`` (and the demo's peers) and
``lowcomm.Trainer``: it counts checkpoints in outer steps, as volunteers do, and decides
``joining`` from the world at ``connect()``.

``RunArchive`` keeps the run's outer state (outer parameters, momentum, outer step) on the run's
remote level (``[checkpoint] remote`` of the run configuration), written by the peer of rank 0 every
few outer steps and by the last peer as it leaves, so that when every peer has left, the next one to
join continues from the last outer step instead of from scratch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowcomm.checkpoint import CheckpointConfig, Checkpointer, NoCheckpointError
from lowcomm.diloco import OuterConfig
from lowcomm.faults import FaultInjector
from lowcomm.trainer import Trainer

__all__ = ["RunArchive", "open_trainer"]

logger = logging.getLogger(__name__)


def open_trainer(
    model: nn.Module,
    inner_optimizer: torch.optim.Optimizer,
    comm: Any,
    *,
    outer: OuterConfig,
    checkpoint: CheckpointConfig | None,
    checkpoint_every_outer: int,
    stateful: Mapping[str, Any],
    faults: FaultInjector | None = None,
    joining: bool | None = None,
) -> Trainer:
    """The ``lowcomm.Trainer`` that ``lowcomm join`` and the demo's peers drive.

    It restores the volunteer's own newest checkpoint, then syncs with the run: alone in the run
    it continues from its checkpoint; joining live peers it keeps only its own state (inner
    optimizer moments, data position, inner step) and takes their outer state, the run's current
    one (never rolled back).

    Args:
        checkpoint_every_outer: outer steps between checkpoints (the volunteers' unit).
        joining: whether live peers hold the run's state (default: ``comm.world_size > 1``, the
            world at ``connect()``; peers that start a run together pass False).
        The rest: as ``lowcomm.Trainer``.

    Raises:
        ValueError: ``checkpoint_every_outer`` < 1.
    """
    if checkpoint_every_outer < 1:
        raise ValueError(f"checkpoint_every_outer must be >= 1, got {checkpoint_every_outer}")
    if joining is None:
        joining = comm.world_size > 1
    return Trainer(
        model,
        inner_optimizer,
        comm,
        outer=outer,
        checkpoint=checkpoint,
        checkpoint_every_outer=None if checkpoint is None else checkpoint_every_outer,
        stateful=stateful,
        faults=faults,
        joining=joining,
    )


class RunArchive:
    """The run's outer state on its remote level, staged through a local directory.

    Args:
        remote: the run's remote URL (``[checkpoint] remote``).
        staging_dir: a local directory for the files before upload (the volunteer's own).
    """

    def __init__(self, remote: str, *, staging_dir: str | Path) -> None:
        self.remote = remote
        self._started: int | None = None  # the outer step this archive last began to save
        self._ckpt = Checkpointer(
            CheckpointConfig(
                levels=(str(staging_dir), remote), keep_last_local=1, keep_last_remote=2
            )
        )

    def latest(self) -> dict[str, torch.Tensor] | None:
        """The newest outer state saved by any peer of the run, or None."""
        try:
            state = self._ckpt.restore()
        except NoCheckpointError:
            return None
        return state

    def save(self, outer: dict[str, torch.Tensor]) -> None:
        """Starts saving ``outer`` (from ``Trainer.outer_state``); returns at once."""
        self._ckpt.wait_until_safe_to_mutate()
        step = int(outer["outer_step"][0])
        if step == self._started or any(info.step == step for info in self._ckpt.checkpoints()):
            # This outer step is saved already (by this peer or another) or being saved: the
            # final save of a peer whose last average was applied early, before it left.
            return
        self._ckpt.save(step, outer)
        self._started = step

    def close(self, *, timeout_s: float = 60.0) -> None:
        """Waits for the uploads in progress."""
        self._ckpt.close(timeout_s)
