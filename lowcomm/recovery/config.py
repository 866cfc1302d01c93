"""The stage-recovery configuration: which rules are on and how the rebuilt stage restarts
(``RecoveryConfig``), and what every stage of a multi-process pipeline agrees on
(``PipelineConfig``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lowcomm.recovery.stages import StageConfig

__all__ = ["AVERAGES", "NORM_POINTS", "ON_LOSS", "PipelineConfig", "RecoveryConfig"]

Average = Literal["gradnorm", "uniform"]
OnLoss = Literal["checkfree", "rollback"]
ON_LOSS: tuple[str, ...] = ("checkfree", "rollback")
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


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """What every stage of one pipeline must agree on.

    Attributes:
        stages: the model's shape (``num_block_stages`` + 1 peers).
        num_micro_batches: micro-batches per step (GPipe); at most 4, since a stage's
            point-to-point pool has four threads and the ring layout's last send waits on stage 0.
        micro_batch_size: sequences per micro-batch.
        lr, max_grad_norm: Adam's rate (betas 0.9, 0.999, as the simulator) and the clip.
        checkpoint_every: each stage saves its state to the ``StageStore`` every this many steps
            (and at step 0); the fallback of the rules.
        recovery: the rules (``RecoveryConfig``).
        on_loss: ``"checkfree"`` (default) rebuilds only the lost stages, by the rules;
            ``"rollback"`` is the checkpoint-based baseline: on any lost stage *every* stage
            restores the newest checkpoint step all stages hold (``StageStore.common_step``) and
            the pipeline redoes the steps since. Rollback needs one replica and no CheckFree+.
        seed: the initialisation's seed (every stage draws the whole model and keeps its part,
            so the pipeline starts as ``SimPipeline`` does).
        timeout_s: the bound of every message and vote.
        rejoin_timeout_s: how long the survivors wait for replacements before ``PipelineError``.
        num_replicas: copies of the pipeline (``lowcomm.recovery.replicas``); each stage's
            replicas are one peer group running DiLoCo among themselves, and a lost slot with a
            surviving replica of its stage is rebuilt as a copy of it.
        outer_every, outer_lr, outer_momentum: DiLoCo among a stage's replicas: every this many
            steps an outer Nesterov SGD step (needed, and only allowed, with ``num_replicas > 1``).
        run_ahead: attempt step t + 1 while step t's commit vote is in flight, on step t applied
            tentatively (``lowcomm.recovery.commit``): the vote's master round trip leaves the
            critical path, at the price of a copy of the stage's parameters and optimizer state
            (3x the parameters with Adam, on the stage's device) kept for the undo. False: every
            step waits for its verdict, and no copy is held.
    """

    stages: StageConfig
    num_micro_batches: int = 2
    micro_batch_size: int = 2
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    on_loss: OnLoss = "checkfree"
    seed: int = 0
    timeout_s: float = 30.0
    rejoin_timeout_s: float = 60.0
    num_replicas: int = 1
    outer_every: int = 0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    run_ahead: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.num_micro_batches <= 4:
            raise ValueError(
                f"PipelineConfig.num_micro_batches must be in 1..4, got {self.num_micro_batches}"
            )
        for name in ("micro_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PipelineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_replicas < 1:
            raise ValueError(f"PipelineConfig.num_replicas must be >= 1, got {self.num_replicas}")
        if (self.num_replicas > 1) != (self.outer_every >= 1):
            raise ValueError(
                "PipelineConfig.outer_every must be >= 1 with num_replicas > 1 (DiLoCo among a "
                f"stage's replicas) and 0 without, got {self.outer_every} with "
                f"{self.num_replicas} replicas"
            )
        if self.on_loss not in ON_LOSS:
            raise ValueError(
                f"PipelineConfig.on_loss must be one of {ON_LOSS}, got {self.on_loss!r}"
            )
        if self.on_loss == "rollback" and (self.num_replicas > 1 or self.recovery.checkfree_plus):
            raise ValueError(
                "PipelineConfig.on_loss='rollback' needs num_replicas=1 and no CheckFree+ (the "
                "checkpoints hold neither DiLoCo's outer state nor the (de)embedding copies)"
            )
        for name in ("lr", "timeout_s", "rejoin_timeout_s", "outer_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PipelineConfig.{name} must be > 0, got {getattr(self, name)}")
