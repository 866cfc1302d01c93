"""Stage recovery for a pipeline over unreliable peers: CheckFree and CheckFree+.

The rules (``rules``) are pure functions over stage state dicts: ``plan_recovery`` picks one rule
per lost stage from the membership, ``rebuild`` applies it. ``ordering`` is CheckFree+'s
out-of-order pipelining; ``stages`` and ``simulator`` run a whole pipeline in one process with a
seeded failure schedule, for convergence experiments (docs/algorithms.md section 4).
``pipeline.StagePeer`` is the multi-process runtime: one stage per peer over ``lowcomm.comm``,
a commit vote per step, lost stages rebuilt by the same rules (docs/recovery.md).
"""

from __future__ import annotations

from lowcomm.recovery.config import RecoveryConfig
from lowcomm.recovery.errors import PipelineError, StepAbortedError
from lowcomm.recovery.ordering import block_order, swap_partner, swaps_enabled
from lowcomm.recovery.pipeline import PipelineConfig, StagePeer
from lowcomm.recovery.rules import (
    EMBEDDING_STAGE,
    GradNorm,
    Membership,
    Plan,
    Rebuilt,
    RecoveryReport,
    Rule,
    Source,
    StageSnapshot,
    average_states,
    choose_rule,
    clip_and_measure,
    lr_scale,
    neighbour_weights,
    plan_recovery,
    rebuild,
)
from lowcomm.recovery.store import StageStore

__all__ = [
    "EMBEDDING_STAGE",
    "GradNorm",
    "Membership",
    "PipelineConfig",
    "PipelineError",
    "Plan",
    "Rebuilt",
    "RecoveryConfig",
    "RecoveryReport",
    "Rule",
    "Source",
    "StagePeer",
    "StageSnapshot",
    "StageStore",
    "StepAbortedError",
    "average_states",
    "block_order",
    "choose_rule",
    "clip_and_measure",
    "lr_scale",
    "neighbour_weights",
    "plan_recovery",
    "rebuild",
    "swap_partner",
    "swaps_enabled",
]
