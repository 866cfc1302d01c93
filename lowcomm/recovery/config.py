"""The stage-recovery configuration: which rules are on and how the rebuilt stage restarts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["AVERAGES", "NORM_POINTS", "RecoveryConfig"]

Average = Literal["gradnorm", "uniform"]
NormPoint = Literal["before_clip", "after_clip"]
AVERAGES: tuple[str, ...] = ("gradnorm", "uniform")
NORM_POINTS: tuple[str, ...] = ("before_clip", "after_clip")


@dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    """How a lost pipeline stage is rebuilt (docs/algorithms.md section 4). Every peer of a run must
    use the same config, since each peer chooses the rule for a lost stage on its own.

    Attributes:
        checkfree_plus: train the first two and the last two block stages swapped on alternate
            micro-batches (needs >= 4 block stages), keep copies of the (de)embedding stage on the
            first and last block stages, and recover the edge stages and the (de)embedding by copy.
            Off: those stages fall back to the checkpoint.
        average: ``"gradnorm"`` weights the two neighbours by their gradient norms (CheckFree);
            ``"uniform"`` is the plain 0.5/0.5 average (the reference prototype's, a baseline).
        norm_point: where a stage's gradient norm is read. ``"before_clip"`` (default) is the norm
            the stage's gradient really had; ``"after_clip"`` is the reference's, which is
            ``max_grad_norm`` whenever the stage clips, so the weights collapse to 0.5/0.5.
        norm_eps: added to each neighbour's norm so that two zero norms still average.
        lr_boost: the rebuilt stage's learning rate is ``lr_boost`` x the base rate right after
            recovery (the paper: 1.1 or 1.2).
        lr_boost_decay_steps: the boost decays linearly back to 1 over this many steps (ours: the
            reference keeps it forever, which changes the stage's schedule for the rest of the run).
        lr_boost_permanent: keep the boost forever, as the reference does.
        embedding_backup_every: with CheckFree+, refresh the (de)embedding copies on the neighbours
            every this many steps; a recovered (de)embedding is at most this many steps stale.
    """

    checkfree_plus: bool = False
    average: Average = "gradnorm"
    norm_point: NormPoint = "before_clip"
    norm_eps: float = 1e-4
    lr_boost: float = 1.1
    lr_boost_decay_steps: int = 100
    lr_boost_permanent: bool = False
    embedding_backup_every: int = 50

    def __post_init__(self) -> None:
        if self.average not in AVERAGES:
            raise ValueError(
                f"RecoveryConfig.average must be one of {AVERAGES}, got {self.average!r}"
            )
        if self.norm_point not in NORM_POINTS:
            raise ValueError(
                f"RecoveryConfig.norm_point must be one of {NORM_POINTS}, got {self.norm_point!r}"
            )
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"RecoveryConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not (math.isfinite(self.lr_boost) and self.lr_boost >= 1.0):
            raise ValueError(f"RecoveryConfig.lr_boost must be >= 1, got {self.lr_boost}")
        if self.lr_boost_decay_steps < 0:
            raise ValueError(
                f"RecoveryConfig.lr_boost_decay_steps must be >= 0, got {self.lr_boost_decay_steps}"
            )
        if self.embedding_backup_every < 1:
            raise ValueError(
                "RecoveryConfig.embedding_backup_every must be >= 1, got "
                f"{self.embedding_backup_every}"
            )
