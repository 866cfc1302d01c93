"""The stage-recovery rules as pure functions: which rule rebuilds a lost stage, and the rebuild.

Stage indices follow the ring layout (docs/algorithms.md section 4): stage 0 holds the
(de)embedding (token and position embeddings, the final norm and the head), block stages are
1..N. The data and the targets both live on stage 0, so nothing but activations and gradients
crosses the pipeline.

A rule is chosen from the membership alone (``choose_rule``), so every peer that sees the same
membership picks the same rule and the same sources without talking to the others. In order:

1. a surviving replica of the stage: copy its parameters and its optimizer state (``REPLICA``);
2. a middle block stage (2..N-1) whose two neighbours are alive: CheckFree, the neighbours'
   gradient-norm weighted average, fresh optimizer state, a decaying learning-rate boost;
3. with CheckFree+: an edge block stage (1 or N) whose swap partner is alive is a copy of the
   partner; the (de)embedding is the copy a neighbour holds (``CHECKFREE_PLUS``), both with fresh
   optimizer state and the boost;
4. anything else (adjacent stages lost together, an edge without CheckFree+): the newest checkpoint
   of the stage, parameters and optimizer state (``CHECKPOINT``). The caller must read it from a
   level that is not on a dead peer's own host or disk.

``rebuild`` then turns a plan and its sources' snapshots into the new stage state and a
``RecoveryReport``. Nothing here touches the network; the sources are whatever the caller fetched.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lowcomm.recovery.config import RecoveryConfig
from lowcomm.recovery.ordering import swap_partner

__all__ = [
    "EMBEDDING_STAGE",
    "GradNorm",
    "Membership",
    "Plan",
    "Rebuilt",
    "RecoveryReport",
    "Rule",
    "Source",
    "StageSnapshot",
    "average_states",
    "choose_rule",
    "clip_and_measure",
    "clone_state",
    "lr_scale",
    "neighbour_weights",
    "plan_recovery",
    "rebuild",
    "state_bytes",
    "state_hash",
]

EMBEDDING_STAGE = 0


class Rule(enum.StrEnum):
    """How a lost stage is rebuilt."""

    REPLICA = "replica"
    CHECKFREE = "checkfree"
    CHECKFREE_PLUS = "checkfree_plus"
    CHECKPOINT = "checkpoint"
    # Not a rule of ``plan_recovery``: a pipeline with ``on_loss="rollback"`` restores *every*
    # stage from the newest checkpoint they all hold (the checkpoint-based baseline).
    ROLLBACK = "rollback"


SourceKind = Literal["replica", "neighbour", "backup", "checkpoint"]


@dataclass(frozen=True)
class Source:
    """Where a rebuild reads from.

    ``kind``: ``"replica"`` (``index`` = the surviving replica's id within the stage's peer group),
    ``"neighbour"`` (``index`` = the block stage whose live weights are read), ``"backup"``
    (``index`` = the block stage holding the (de)embedding copy) or ``"checkpoint"`` (``index`` =
    the lost stage, read from the checkpoint).
    """

    kind: SourceKind
    index: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}"


@dataclass(frozen=True, kw_only=True)
class Membership:
    """What every peer knows after a failure: the pipeline's shape and who is gone.

    Attributes:
        num_block_stages: N; stages are 0 (the (de)embedding) and 1..N.
        lost: the stages that lost a peer and need a replacement rebuilt.
        replicas: for a stage with more than one replica, the ids of its surviving replicas. A lost
            stage with a survivor here is copied from it; a stage listed in ``lost`` without one
            lost every replica.
        embedding_backups: the block stages holding a current copy of the (de)embedding (CheckFree+);
            None means the default holders, the first and last block stages.
    """

    num_block_stages: int
    lost: frozenset[int]
    replicas: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    embedding_backups: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if self.num_block_stages < 1:
            raise ValueError(
                f"Membership.num_block_stages must be >= 1, got {self.num_block_stages}"
            )
        bad = sorted(s for s in self.lost if not 0 <= s <= self.num_block_stages)
        if bad:
            raise ValueError(
                f"Membership.lost has stages outside 0..{self.num_block_stages}: {bad}"
            )

    def alive(self, stage: int) -> bool:
        """Whether some peer still holds ``stage``'s current state."""
        return stage not in self.lost or bool(self.replicas.get(stage))

    def backup_holders(self) -> tuple[int, ...]:
        """The live block stages holding a (de)embedding copy, lowest first."""
        n = self.num_block_stages
        holders = self.embedding_backups if self.embedding_backups is not None else {1, n}
        return tuple(sorted(h for h in holders if 1 <= h <= n and self.alive(h)))


@dataclass(frozen=True)
class Plan:
    """The rule chosen for one lost stage and the sources it reads."""

    stage: int
    rule: Rule
    sources: tuple[Source, ...]


def choose_rule(stage: int, membership: Membership, config: RecoveryConfig) -> Plan:
    """The rule for lost stage ``stage``; a pure function of its arguments, so every peer agrees."""
    n = membership.num_block_stages
    if not 0 <= stage <= n:
        raise ValueError(f"stage must be in 0..{n}, got {stage}")
    survivors = membership.replicas.get(stage, ())
    if survivors:
        return Plan(stage, Rule.REPLICA, (Source("replica", min(survivors)),))
    if stage == EMBEDDING_STAGE:
        holders = membership.backup_holders()
        if config.checkfree_plus and holders:
            return Plan(stage, Rule.CHECKFREE_PLUS, (Source("backup", holders[0]),))
    elif 1 < stage < n:
        if membership.alive(stage - 1) and membership.alive(stage + 1):
            sources = (Source("neighbour", stage - 1), Source("neighbour", stage + 1))
            return Plan(stage, Rule.CHECKFREE, sources)
    else:
        partner = swap_partner(stage, n)
        if config.checkfree_plus and partner is not None and membership.alive(partner):
            return Plan(stage, Rule.CHECKFREE_PLUS, (Source("neighbour", partner),))
    return Plan(stage, Rule.CHECKPOINT, (Source("checkpoint", stage),))


def plan_recovery(membership: Membership, config: RecoveryConfig) -> list[Plan]:
    """One plan per lost stage, in stage order. Every source is a live stage, never a lost one."""
    return [choose_rule(s, membership, config) for s in sorted(membership.lost)]


@dataclass(frozen=True)
class GradNorm:
    """A stage's gradient L2 norm in its last step, before and after clipping."""

    before_clip: float
    after_clip: float


def clip_and_measure(parameters: Iterable[torch.Tensor], max_norm: float) -> GradNorm:
    """``torch.nn.utils.clip_grad_norm_`` that also returns the norm after clipping.

    The clip is the stock one, so a stage using this trains exactly as one calling torch's. One
    ``.item()`` sync each for the two norms.
    """
    params = [p for p in parameters if p.grad is not None]
    before = torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return GradNorm(before_clip=float(before.item()), after_clip=float(after.item()))


@dataclass(frozen=True)
class StageSnapshot:
    """One source's state as the rebuild reads it: parameters (a module's ``state_dict``), the
    optimizer's ``state_dict`` (or None), the gradient norm of its last step (or None)."""

    params: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any] | None = None
    grad_norm: GradNorm | None = None


@dataclass(frozen=True)
class RecoveryReport:
    """What one recovery did. ``bytes`` counts what was read from the sources (the transfer a
    multi-process runtime makes); ``seconds`` is the rebuild's own time (plus the caller's
    transfer, where it adds it)."""

    stage: int
    rule: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    bytes: int
    seconds: float


@dataclass(frozen=True)
class Rebuilt:
    """A rebuilt stage: new parameters, the optimizer state to load (None: start a fresh
    optimizer), whether the learning-rate boost applies, and the report."""

    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    lr_boost: bool
    report: RecoveryReport


def clone_state(state: Any) -> Any:
    """A deep copy of a (nested) state dict: every tensor cloned, containers rebuilt."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    if isinstance(state, tuple):
        return tuple(clone_state(v) for v in state)
    return state


def state_bytes(state: Any) -> int:
    """The bytes of every tensor in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state)
    return 0


def neighbour_weights(
    previous: GradNorm | None, following: GradNorm | None, config: RecoveryConfig
) -> tuple[float, float]:
    """CheckFree's weights (ω_{i-1}, ω_{i+1}) for the stages before and after the lost one.

    ``"gradnorm"``: each neighbour's gradient norm at ``config.norm_point`` plus ``norm_eps``; a
    neighbour that has not stepped yet (None) counts as norm 0. ``"uniform"``: (1, 1).
    """
    if config.average == "uniform":
        return (1.0, 1.0)

    def omega(norm: GradNorm | None) -> float:
        if norm is None:
            return config.norm_eps
        value = norm.before_clip if config.norm_point == "before_clip" else norm.after_clip
        return value + config.norm_eps

    return (omega(previous), omega(following))


def average_states(
    previous: Mapping[str, torch.Tensor],
    following: Mapping[str, torch.Tensor],
    *,
    weights: tuple[float, float],
) -> dict[str, torch.Tensor]:
    """``W = (ω_next·W_next + ω_prev·W_prev) / (ω_next + ω_prev)``, tensor by tensor, in the
    tensors' own dtype, in exactly this order of operations (so a reference can match it bit for
    bit). Floating tensors only are averaged; any other (an integer buffer) is copied from
    ``previous``."""
    if previous.keys() != following.keys():
        raise ValueError(
            "neighbour stages differ in their tensors: "
            f"{sorted(set(previous) ^ set(following))[:5]} ..."
        )
    w_prev, w_next = weights
    total = w_next + w_prev
    if not total > 0:
        raise ValueError(f"neighbour weights must sum to > 0, got {weights}")
    out: dict[str, torch.Tensor] = {}
    for name, p in previous.items():
        q = following[name]
        if p.shape != q.shape:
            raise ValueError(f"{name}: shapes {tuple(p.shape)} and {tuple(q.shape)} differ")
        if p.is_floating_point():
            out[name] = (w_next * q + w_prev * p) / total
        else:
            out[name] = p.detach().clone()
    return out


def lr_scale(steps_since_recovery: int | None, config: RecoveryConfig) -> float:
    """The learning-rate multiplier of a rebuilt stage ``steps_since_recovery`` steps after it
    was rebuilt (0: its first step). None (never rebuilt, or a copied replica) gives 1.

    Ours: ``1 + (boost - 1) * max(0, 1 - t / decay_steps)``, a linear decay back to the base rate;
    with ``lr_boost_permanent`` (the reference) the boost stays forever.
    """
    if steps_since_recovery is None:
        return 1.0
    if steps_since_recovery < 0:
        raise ValueError(f"steps_since_recovery must be >= 0, got {steps_since_recovery}")
    boost = config.lr_boost - 1.0
    if config.lr_boost_permanent:
        return 1.0 + boost
    if config.lr_boost_decay_steps == 0:
        return 1.0
    left = max(0.0, 1.0 - steps_since_recovery / config.lr_boost_decay_steps)
    return 1.0 + boost * left


def rebuild(
    plan: Plan, snapshots: Mapping[Source, StageSnapshot], config: RecoveryConfig
) -> Rebuilt:
    """Apply ``plan``: ``snapshots`` holds one snapshot per source of the plan.

    ``REPLICA`` and ``CHECKPOINT`` copy the parameters and the optimizer state (a snapshot
    without one starts a fresh optimizer) and apply no boost; ``CHECKFREE`` averages the two
    neighbours; ``CHECKFREE_PLUS`` copies the partner's or the backup's parameters. Both CheckFree
    rules start a fresh optimizer and apply the boost. Raises ``ValueError`` if a source is missing.
    """
    start = time.perf_counter()
    missing = [str(s) for s in plan.sources if s not in snapshots]
    if missing:
        raise ValueError(f"rebuild of stage {plan.stage} ({plan.rule}) lacks sources {missing}")
    used: Sequence[StageSnapshot] = [snapshots[s] for s in plan.sources]
    weights: tuple[float, ...] = (1.0,)
    optimizer: dict[str, Any] | None = None
    if plan.rule is Rule.CHECKFREE:
        prev, nxt = used
        pair = neighbour_weights(prev.grad_norm, nxt.grad_norm, config)
        params = average_states(prev.params, nxt.params, weights=pair)
        weights = pair
        read = state_bytes(prev.params) + state_bytes(nxt.params)
    elif plan.rule is Rule.CHECKFREE_PLUS:
        params = clone_state(used[0].params)
        read = state_bytes(used[0].params)
    else:
        params = clone_state(used[0].params)
        optimizer = clone_state(used[0].optimizer) if used[0].optimizer is not None else None
        read = state_bytes(used[0].params) + state_bytes(used[0].optimizer)
    report = RecoveryReport(
        stage=plan.stage,
        rule=str(plan.rule),
        sources=tuple(str(s) for s in plan.sources),
        weights=tuple(weights),
        bytes=read,
        seconds=time.perf_counter() - start,
    )
    boost = plan.rule in (Rule.CHECKFREE, Rule.CHECKFREE_PLUS)
    return Rebuilt(params=params, optimizer=optimizer, lr_boost=boost, report=report)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """A short sha256 of a state dict's tensors, in key order (to compare stages across peers)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
