"""What a recovery of the pipeline runtime moves: the state a source serves to a lost stage's
replacement (``served_state``), the snapshots the replacement rebuilds from (``read_snapshots``),
and, for a pipeline that rolls back instead (``PipelineConfig.on_loss="rollback"``), the
checkpoint step every stage returns to (``rollback_checkpoint``). Used by ``pipeline.StagePeer``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lowcomm.recovery.errors import PipelineError
from lowcomm.recovery.replicas import OuterState, Slot
from lowcomm.recovery.rules import GradNorm, Plan, Source, StageSnapshot, clone_state
from lowcomm.recovery.store import StageStore

__all__ = ["read_snapshots", "rollback_checkpoint", "served_state"]

Receive = Callable[[Slot], tuple[Any, int]]


def served_state(
    source: Source,
    *,
    module: nn.Module,
    optimizer: Any,
    grad_norm: GradNorm | None,
    backup: dict[str, Any] | None,
    outer: OuterState | None,
    stage: int,
) -> dict[str, Any]:
    """What source ``source`` (this stage) sends the replacement: its parameters and gradient
    norm (as Python floats, so the weights are exactly the source's); a replica also its optimizer
    and, under DiLoCo, its *outer* parameters and momentum; a backup holder its (de)embedding copy."""
    if source.kind == "backup":
        if backup is None:
            raise PipelineError(f"stage {stage} holds no (de)embedding copy to serve")
        return {"params": backup, "grad_norm": None}
    norm = None if grad_norm is None else (grad_norm.before_clip, grad_norm.after_clip)
    obj: dict[str, Any] = {"params": clone_state(module.state_dict()), "grad_norm": norm}
    if source.kind == "replica":
        # A copy of this replica: under DiLoCo its outer parameters (never the mid-round inner
        # ones), the outer momentum, and the inner optimizer's state.
        assert outer is not None
        state = outer.state()
        obj["params"].update(clone_state(state["params"]))
        obj["optimizer"] = clone_state(optimizer.state_dict())
        obj["outer"] = state
    return obj


def read_snapshots(
    plan: Plan, *, store: StageStore, stage: int, replica: int, receive: Receive
) -> tuple[dict[Source, StageSnapshot], dict[str, Any] | None, int]:
    """The snapshots of ``plan``'s sources (checkpoints from ``store``, the others through
    ``receive(slot) -> (obj, bytes)``), a replica's outer state (or None), and the bytes received."""
    snapshots: dict[Source, StageSnapshot] = {}
    outer = None
    received = 0
    for source in plan.sources:
        if source.kind == "checkpoint":
            ckpt = store.load(stage, replica=replica)
            if ckpt is None:
                raise PipelineError(f"stage {stage} was lost and has no checkpoint")
            snapshots[source] = StageSnapshot(ckpt["params"], ckpt["optimizer"])
            continue
        slot = (stage, source.index) if source.kind == "replica" else (source.index, replica)
        obj, size = receive(slot)
        received += size
        norm = obj["grad_norm"]
        outer = obj.get("outer", outer)
        snapshots[source] = StageSnapshot(
            obj["params"],
            obj.get("optimizer"),
            grad_norm=None if norm is None else GradNorm(*norm),
        )
    return snapshots, outer, received


def rollback_checkpoint(
    store: StageStore, stage: int, num_stages: int
) -> tuple[int, dict[str, Any]]:
    """The rollback's target, the newest step that every stage of ``0..num_stages - 1`` has a
    checkpoint of in ``store`` (every peer reads the same store after the same vote, so every peer
    finds the same step), and stage ``stage``'s checkpoint of it."""
    step = store.common_step(range(num_stages))
    if step is None:
        raise PipelineError(f"no checkpoint step is held by all of stages 0..{num_stages - 1}")
    ckpt = store.load(stage, step=step)
    if ckpt is None:  # pruned since: only if a save raced the recovery
        raise PipelineError(f"stage {stage}: its checkpoint of step {step} is gone")
    return step, ckpt
