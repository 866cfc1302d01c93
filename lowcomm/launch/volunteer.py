"""A volunteer's training state: its own local checkpoint, and the run's outer state on the remote.

``open_trainer`` is the one seam between ``lowcomm join`` and the trainer: it has the signature of
``lowcomm.Trainer`` (``model, inner_optimizer, comm, *, outer, checkpoint, checkpoint_every,
stateful``) and today wraps ``DiLoCo`` and a ``Checkpointer``; when ``lowcomm.Trainer`` lands, it
becomes ``return Trainer(...)`` and ``VolunteerTrainer`` goes away.

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
from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.diloco.trainer import OuterStats
from lowcomm.faults import FaultInjector

__all__ = ["RunArchive", "VolunteerTrainer", "open_trainer"]

logger = logging.getLogger(__name__)


def open_trainer(
    model: nn.Module,
    inner_optimizer: torch.optim.Optimizer,
    comm: Any,
    *,
    outer: OuterConfig,
    checkpoint: CheckpointConfig | None,
    checkpoint_every: int,
    stateful: Mapping[str, Any],
    faults: FaultInjector | None = None,
    joining: bool | None = None,
) -> VolunteerTrainer:
    """The trainer ``lowcomm join`` and the demo's peers drive (at merge: ``lowcomm.Trainer``
    with these arguments)."""
    return VolunteerTrainer(
        model,
        inner_optimizer,
        comm,
        outer=outer,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        stateful=stateful,
        faults=faults,
        joining=joining,
    )


class VolunteerTrainer:
    """DiLoCo plus a local checkpoint every ``checkpoint_every`` outer steps, restored on start.

    On start it restores its own newest checkpoint: when it is alone in the run, all of it (model,
    outer state, inner optimizer, data position, RNG); when it joins live peers, only its own local
    state (inner optimizer moments, data position, inner step), since the outer state it just
    received from them is the run's current one (never rolled back). ``joining``: whether live
    peers hold the run's state (default: ``comm.world_size > 1``; peers that start a run together
    pass False). Training thread only.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        comm: Any,
        *,
        outer: OuterConfig,
        checkpoint: CheckpointConfig | None,
        checkpoint_every: int,
        stateful: Mapping[str, Any],
        faults: FaultInjector | None = None,
        joining: bool | None = None,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.model, self.inner_optimizer, self.comm = model, inner_optimizer, comm
        self.stateful = dict(stateful)
        self.checkpoint_every = checkpoint_every
        if joining is None:  # the world at connect(): live peers hold the run's outer state
            joining = comm.world_size > 1
        self.diloco = DiLoCo(
            model, inner_optimizer, comm, config=outer, joining=joining, faults=faults
        )
        self.inner_step = 0
        self.resumed_from: int | None = None  # the inner step of the checkpoint restored
        self._ckpt = Checkpointer(checkpoint) if checkpoint is not None else None
        if self._ckpt is not None:
            self._restore(joining=joining)

    @property
    def outer_step(self) -> int:
        return self.diloco.stats.outer_steps

    @property
    def stats(self) -> OuterStats:
        return self.diloco.stats

    def step(self) -> None:
        """One inner step (after ``loss.backward()``), the outer sync when due, a checkpoint when
        due (returns at once; the copy overlaps the next forward/backward)."""
        if self._ckpt is not None:
            self._ckpt.wait_until_safe_to_mutate()
        before = self.outer_step
        self.diloco.step()
        self.inner_step += 1
        if self.outer_step != before and self.outer_step % self.checkpoint_every == 0:
            self.save()

    def save(self) -> None:
        """Checkpoints everything now (waits for the all-reduces in flight). No-op without one."""
        if self._ckpt is None:
            return
        self._ckpt.wait_until_safe_to_mutate()
        state = {
            "model": self.model.state_dict(),
            "diloco": self.diloco.state_dict(),
            "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
            "inner_step": self.inner_step,
            "rng": torch.get_rng_state(),
        }
        self._ckpt.save(self.inner_step, state, metadata={"outer_step": self.outer_step})

    def close(self, *, timeout_s: float = 60.0) -> None:
        """Waits for the checkpoints in progress to be written."""
        if self._ckpt is not None:
            self._ckpt.close(timeout_s)

    def outer_state(self) -> dict[str, torch.Tensor]:
        """A copy of the run's outer state as this peer holds it (for ``RunArchive``)."""
        return {
            "theta": self.diloco.outer_params.detach().clone(),
            "momentum": self.diloco.outer_momentum.detach().clone(),
            "outer_step": torch.tensor([self.outer_step], dtype=torch.int64),
        }

    def load_outer_state(self, outer: Mapping[str, torch.Tensor]) -> None:
        """Replaces the outer state with ``outer`` (from ``RunArchive``) and loads it into the
        model; only when this peer is alone in the run. Rounds in flight are dropped."""
        state = self.diloco.state_dict()
        if outer["theta"].shape != state["outer"]["theta"].shape:
            raise ValueError(
                f"the run's saved outer state has {outer['theta'].numel()} parameters, this "
                f"task's model {state['outer']['theta'].numel()}: not the same model"
            )
        state["outer"]["theta"] = outer["theta"]
        state["outer"]["momentum"] = outer["momentum"]
        counters = state["outer"]["counters"].clone()
        counters[0] = int(outer["outer_step"][0])
        state["outer"]["counters"] = counters
        state.update(flights={}, carry=None, round_steps=0)
        self.diloco.load_state_dict(state)
        self.diloco.copy_outer_to(self.model)

    def _restore(self, *, joining: bool) -> None:
        assert self._ckpt is not None
        try:
            state = self._ckpt.restore()
        except NoCheckpointError:
            return
        try:
            if joining:
                # The live peers' outer state is the run's current one: keep it, and take from
                # the checkpoint only what is this peer's own.
                self.inner_optimizer.load_state_dict(state["diloco"]["inner_optimizer"])
            else:
                self.diloco.load_state_dict(state["diloco"])
                self.model.load_state_dict(state["model"])
                torch.set_rng_state(state["rng"])
            for name, obj in self.stateful.items():
                if name in state["stateful"]:
                    obj.load_state_dict(state["stateful"][name])
        except (ValueError, KeyError, RuntimeError) as exc:
            logger.warning(
                "not resuming from the local checkpoint of inner step %s (another model or "
                "outer loop?): %s",
                state.get("inner_step"),
                exc,
            )
            return
        self.inner_step = self.resumed_from = int(state["inner_step"])
        logger.info(
            "resumed from the local checkpoint of inner step %d (outer step %d%s; restored %s)",
            self.inner_step,
            self.outer_step,
            ", the live run's" if joining else "",
            ", ".join(["inner optimizer", *self.stateful]),
        )


class RunArchive:
    """The run's outer state on its remote level, staged through a local directory.

    Args:
        remote: the run's remote URL (``[checkpoint] remote``).
        staging_dir: a local directory for the files before upload (the volunteer's own).
    """

    def __init__(self, remote: str, *, staging_dir: str | Path) -> None:
        self.remote = remote
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
        """Starts saving ``outer`` (from ``VolunteerTrainer.outer_state``); returns at once."""
        self._ckpt.wait_until_safe_to_mutate()
        step = int(outer["outer_step"][0])
        if any(info.step == step for info in self._ckpt.checkpoints()):
            return  # this outer step is saved already (by this peer or another)
        self._ckpt.save(step, outer)

    def close(self, *, timeout_s: float = 60.0) -> None:
        """Waits for the uploads in progress."""
        self._ckpt.close(timeout_s)
