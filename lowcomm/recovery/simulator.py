"""A pipeline of stages in one process with a seeded failure schedule, for recovery experiments.

Every stage (``stages.py``: stage 0 the (de)embedding, block stages 1..N) lives in this process
with its own Adam and its own gradient clipping, as it would on its own peer. A step runs
``num_micro_batches`` micro-batches through the stages in GPipe order (all forwards of a
micro-batch, then its backward; gradients accumulate) and then steps every stage's optimizer. With
CheckFree+ the odd micro-batches run the edge block stages swapped (``ordering.block_order``).

Failures come from a ``FailureSchedule`` built once and handed to every method, so every method
sees the same failures. A failure at step t strikes before step t's first micro-batch and really
destroys the stage: its parameters become NaN, its optimizer and its gradient-norm record are
dropped, and a (de)embedding copy it held is gone; a lost neighbour is gone too, so it is never a
source. The stage is then rebuilt by the method's rule (``rules.plan_recovery`` / ``rules.rebuild``)
and step t runs. Checkpoints are in-memory copies of every stage and optimizer taken every
``checkpoint_every`` steps, standing in for a level off the failed peer's host. Rollback restores
the whole pipeline from the last one and really loses the steps since then (the reference saved
every iteration, so its rollback never lost work).

Seeded and bit-reproducible on the CPU: the initialisation, the data, the random re-initialisations
and the failures each draw from their own ``torch.Generator``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lowcomm.recovery.config import RecoveryConfig
from lowcomm.recovery.ordering import block_order, swaps_enabled
from lowcomm.recovery.rules import (
    GradNorm,
    Membership,
    Plan,
    RecoveryReport,
    Rule,
    Source,
    StageSnapshot,
    clip_and_measure,
    clone_state,
    lr_scale,
    plan_recovery,
    rebuild,
    state_bytes,
)
from lowcomm.recovery.stages import StageConfig, build_stages, init_stage_

__all__ = [
    "FailureSchedule",
    "Method",
    "SimConfig",
    "SimPipeline",
    "SimResult",
    "simulate",
    "standard_methods",
]

logger = logging.getLogger(__name__)

Middle = Literal["rule", "copy", "random"]


@dataclass(frozen=True, kw_only=True)
class Method:
    """One way of surviving failures.

    Attributes:
        name: the label in reports.
        recovery: the rules' configuration (CheckFree+, the average, the norm point, the boost).
        middle: what rebuilds a stage the rules give to CheckFree: ``"rule"`` (the rules' own
            average), or the baselines ``"copy"`` (the previous block stage's weights) and
            ``"random"`` (a fresh initialisation); all with a fresh optimizer and the boost.
        rollback: on any failure, restore the whole pipeline from the last checkpoint instead.
        checkpoint_every: steps between checkpoints (the rules' fallback, or the rollback's).
        failures: False ignores the schedule (the no-failure run).
    """

    name: str
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    middle: Middle = "rule"
    rollback: bool = False
    checkpoint_every: int = 100
    failures: bool = True

    def __post_init__(self) -> None:
        if self.middle not in ("rule", "copy", "random"):
            raise ValueError(f"Method.middle must be rule, copy or random, got {self.middle!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"Method.checkpoint_every must be >= 1, got {self.checkpoint_every}")


def standard_methods(
    *, rollback_every: Sequence[int] = (50, 100), checkpoint_every: int = 100
) -> dict[str, Method]:
    """The methods of the benchmark, by name (docs/algorithms.md section 4): ``rollback_K`` for
    each K in ``rollback_every``; the others fall back to a checkpoint every ``checkpoint_every``
    steps where their rules cannot rebuild a stage."""
    plus = RecoveryConfig(checkfree_plus=True)
    k = checkpoint_every
    methods = [
        Method(name="no_failure", failures=False, checkpoint_every=k),
        Method(name="no_failure_swaps", recovery=plus, failures=False, checkpoint_every=k),
        Method(name="random", middle="random", checkpoint_every=k),
        Method(name="copy", middle="copy", checkpoint_every=k),
        Method(name="uniform", recovery=RecoveryConfig(average="uniform"), checkpoint_every=k),
        Method(name="gradavg", checkpoint_every=k),
        Method(
            name="gradavg_after_clip",
            recovery=RecoveryConfig(norm_point="after_clip"),
            checkpoint_every=k,
        ),
        Method(name="checkfree_plus", recovery=plus, checkpoint_every=k),
    ]
    methods += [
        Method(name=f"rollback_{k}", rollback=True, checkpoint_every=k) for k in rollback_every
    ]
    return {m.name: m for m in methods}


@dataclass(frozen=True)
class FailureSchedule:
    """Which stages fail at the start of which step: ``events[step]`` is a set of stage indices."""

    events: Mapping[int, frozenset[int]]

    @classmethod
    def random(
        cls, *, num_steps: int, stages: Sequence[int], rate: float, seed: int
    ) -> FailureSchedule:
        """Each of ``stages`` fails independently with probability ``rate`` per step, drawn from
        one generator seeded with ``seed`` (the same schedule for every method)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        gen = torch.Generator().manual_seed(seed)
        draws = torch.rand((num_steps, len(stages)), generator=gen, dtype=torch.float64)
        events = {}
        for step, row in enumerate(draws.tolist()):
            hit = frozenset(s for s, u in zip(stages, row, strict=True) if u < rate)
            if hit:
                events[step] = hit
        return cls(events)

    @classmethod
    def scripted(cls, events: Mapping[int, Sequence[int]]) -> FailureSchedule:
        return cls({step: frozenset(stages) for step, stages in events.items() if stages})

    def at(self, step: int) -> frozenset[int]:
        return self.events.get(step, frozenset())

    @property
    def num_failures(self) -> int:
        return sum(len(s) for s in self.events.values())


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """The training run every method shares."""

    stages: StageConfig = field(default_factory=StageConfig)
    num_steps: int = 3000
    batch_size: int = 16
    num_micro_batches: int = 4
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    eval_every: int = 10
    num_eval_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size", "num_micro_batches", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SimConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_micro_batches:
            raise ValueError(
                f"SimConfig.batch_size ({self.batch_size}) must be divisible by "
                f"num_micro_batches ({self.num_micro_batches})"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"SimConfig.lr must be > 0, got {self.lr}")


@dataclass
class SimResult:
    """One run. ``eval_losses[k]`` is the validation loss after ``eval_steps[k]`` steps;
    ``pre_failure`` and ``post_recovery`` map a failure step to the validation loss just before
    the failure and right after the rebuild (before that step trains); ``lost_steps`` counts the
    steps a rollback threw away."""

    method: str
    train_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    pre_failure: dict[int, float] = field(default_factory=dict)
    post_recovery: dict[int, float] = field(default_factory=dict)
    reports: list[tuple[int, RecoveryReport]] = field(default_factory=list)
    lost_steps: int = 0
    seconds: float = 0.0


@dataclass
class _Checkpoint:
    step: int
    params: list[dict[str, torch.Tensor]]
    optimizers: list[dict[str, Any]]


class SimPipeline:
    """The pipeline ``simulate`` drives, public so a test can stop between its moves.

    ``destroy`` a stage, ``recover`` the lost ones (appending reports to a ``SimResult``),
    ``train_step``, ``evaluate``. ``modules[0]`` is the (de)embedding, ``modules[i]`` block stage
    i; ``optimizers``, ``grad_norms`` and ``checkpoint`` follow the same indices.
    """

    def __init__(self, config: SimConfig, method: Method) -> None:
        self.config = config
        self.method = method
        self.num_blocks = config.stages.num_block_stages
        self.swap = swaps_enabled(self.num_blocks, checkfree_plus=method.recovery.checkfree_plus)
        embedding, blocks = build_stages(
            config.stages, generator=torch.Generator().manual_seed(config.seed)
        )
        self.embedding = embedding
        self.modules: list[nn.Module] = [embedding, *blocks]
        self.optimizers = [self._optimizer(m) for m in self.modules]
        self.grad_norms: list[GradNorm | None] = [None] * len(self.modules)
        self.rebuilt_at: list[int | None] = [None] * len(self.modules)
        self.backups: dict[int, dict[str, torch.Tensor]] = {}
        self.checkpoint = self._snapshot(0)
        if method.recovery.checkfree_plus:
            self._refresh_backups(missing_only=False)

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        # Adam (0.9, 0.999), no weight decay, as every config of the reference.
        return torch.optim.Adam(module.parameters(), lr=self.config.lr, betas=(0.9, 0.999))

    def _snapshot(self, step: int) -> _Checkpoint:
        return _Checkpoint(
            step=step,
            params=[clone_state(m.state_dict()) for m in self.modules],
            optimizers=[clone_state(o.state_dict()) for o in self.optimizers],
        )

    def _holders(self) -> tuple[int, ...]:
        return tuple(sorted({1, self.num_blocks}))

    def _refresh_backups(self, *, missing_only: bool) -> None:
        state = self.embedding.state_dict()
        for h in self._holders():
            if not missing_only or h not in self.backups:
                self.backups[h] = clone_state(state)

    def destroy(self, stage: int) -> None:
        with torch.no_grad():
            for p in self.modules[stage].parameters():
                p.fill_(float("nan"))
        self.optimizers[stage] = self._optimizer(self.modules[stage])
        self.grad_norms[stage] = None
        self.rebuilt_at[stage] = None
        self.backups.pop(stage, None)

    def _load(self, stage: int, params: Mapping[str, torch.Tensor], optimizer: Any) -> None:
        self.modules[stage].load_state_dict(params)
        self.optimizers[stage] = self._optimizer(self.modules[stage])
        if optimizer is not None:
            self.optimizers[stage].load_state_dict(optimizer)

    def recover(self, step: int, lost: frozenset[int], result: SimResult) -> None:
        if self.method.rollback:
            self._rollback(step, lost, result)
            return
        rc = self.method.recovery
        membership = Membership(
            num_block_stages=self.num_blocks,
            lost=lost,
            embedding_backups=frozenset(self.backups) if rc.checkfree_plus else frozenset(),
        )
        plans = plan_recovery(membership, rc)
        # Every source is a live stage and every target a lost one, so the order cannot matter.
        for plan in plans:
            if plan.rule is Rule.CHECKFREE and self.method.middle != "rule":
                params, report = self._baseline(step, plan)
                self._load(plan.stage, params, None)
                boost = True
            else:
                rebuilt = rebuild(plan, {s: self._source(s) for s in plan.sources}, rc)
                self._load(plan.stage, rebuilt.params, rebuilt.optimizer)
                report, boost = rebuilt.report, rebuilt.lr_boost
            self.rebuilt_at[plan.stage] = step if boost else None
            result.reports.append((step, report))
            logger.debug("step %d: %s", step, report)
        if rc.checkfree_plus:
            # A replacement holder receives the current (de)embedding as part of joining.
            self._refresh_backups(missing_only=True)

    def _source(self, source: Source) -> StageSnapshot:
        if source.kind == "neighbour":
            i = source.index
            return StageSnapshot(self.modules[i].state_dict(), grad_norm=self.grad_norms[i])
        if source.kind == "backup":
            return StageSnapshot(self.backups[source.index])
        if source.kind == "checkpoint":
            i = source.index
            return StageSnapshot(self.checkpoint.params[i], self.checkpoint.optimizers[i])
        raise ValueError(f"the simulator has no replicas to read {source}")

    def _baseline(self, step: int, plan: Plan) -> tuple[dict[str, torch.Tensor], RecoveryReport]:
        start = time.perf_counter()
        stage = plan.stage
        if self.method.middle == "copy":
            params = clone_state(self.modules[stage - 1].state_dict())
            sources: tuple[str, ...] = (str(Source("neighbour", stage - 1)),)
            read = state_bytes(params)
        else:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * 1009 + stage)
            init_stage_(self.modules[stage], self.config.stages, generator=gen)
            params = clone_state(self.modules[stage].state_dict())
            sources, read = (), 0
        report = RecoveryReport(
            stage=stage,
            rule=self.method.middle,
            sources=sources,
            weights=(1.0,) if sources else (),
            bytes=read,
            seconds=time.perf_counter() - start,
        )
        return params, report

    def _rollback(self, step: int, lost: frozenset[int], result: SimResult) -> None:
        start = time.perf_counter()
        ckpt = self.checkpoint
        for i in range(len(self.modules)):
            self._load(i, ckpt.params[i], ckpt.optimizers[i])
            self.grad_norms[i] = None
            self.rebuilt_at[i] = None
        result.lost_steps += step - ckpt.step
        read = state_bytes(ckpt.params) + state_bytes(ckpt.optimizers)
        seconds = time.perf_counter() - start
        for stage in sorted(lost):
            report = RecoveryReport(
                stage=stage,
                rule="rollback",
                sources=(f"checkpoint:step{ckpt.step}",),
                weights=(),
                bytes=read,
                seconds=seconds,
            )
            result.reports.append((step, report))

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
        for i, opt in enumerate(self.optimizers):
            t = self.rebuilt_at[i]
            scale = lr_scale(None if t is None else step - t, self.method.recovery)
            for group in opt.param_groups:
                group["lr"] = self.config.lr * scale
            opt.zero_grad(set_to_none=True)
        m = self.config.num_micro_batches
        total = 0.0
        for mb, (xm, ym) in enumerate(zip(x.chunk(m), y.chunk(m), strict=True)):
            h = self.embedding.embed(xm)
            for i in block_order(mb, self.num_blocks, swap=self.swap):
                h = self.modules[i](h)
            loss = self.embedding.loss(h, ym)
            (loss / m).backward()
            total += loss.item()
        for i, (module, opt) in enumerate(zip(self.modules, self.optimizers, strict=True)):
            self.grad_norms[i] = clip_and_measure(module.parameters(), self.config.max_grad_norm)
            opt.step()
        done = step + 1
        if done % self.method.checkpoint_every == 0:
            self.checkpoint = self._snapshot(done)
        if (
            self.method.recovery.checkfree_plus
            and done % self.method.recovery.embedding_backup_every == 0
        ):
            self._refresh_backups(missing_only=False)
        return total / m

    @torch.no_grad()
    def evaluate(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        total = 0.0
        for x, y in batches:
            h = self.embedding.embed(x)
            for i in range(1, self.num_blocks + 1):
                h = self.modules[i](h)
            total += self.embedding.loss(h, y).item()
        return total / len(batches)


def _batch(
    data: torch.Tensor, *, batch_size: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if data.numel() <= context + 1:
        raise ValueError(f"data of {data.numel()} tokens is shorter than context {context} + 1")
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
    window = data[starts[:, None] + torch.arange(context + 1)[None, :]].long()
    return window[:, :-1], window[:, 1:]


def simulate(
    config: SimConfig,
    method: Method,
    *,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    schedule: FailureSchedule | None = None,
) -> SimResult:
    """Train the pipeline for ``config.num_steps`` steps under ``method`` and ``schedule``.

    ``train_data`` and ``val_data`` are 1-D token tensors (bytes). Every method draws the same
    batches (a generator seeded from ``config.seed``); the validation loss is measured on fixed
    batches in pipeline order every ``eval_every`` steps, and around every failure. Runs in the
    calling thread; deterministic on the CPU for a given torch build and thread count.
    """
    start = time.perf_counter()
    sc = config.stages
    pipeline = SimPipeline(config, method)
    result = SimResult(method=method.name)
    val_gen = torch.Generator().manual_seed(config.seed + 7_919)
    val = [
        _batch(val_data, batch_size=config.batch_size, context=sc.context, generator=val_gen)
        for _ in range(config.num_eval_batches)
    ]
    data_gen = torch.Generator().manual_seed(config.seed + 104_729)
    for step in range(config.num_steps):
        lost = schedule.at(step) if schedule is not None and method.failures else frozenset()
        if lost:
            result.pre_failure[step] = pipeline.evaluate(val)
            for stage in lost:
                pipeline.destroy(stage)
            pipeline.recover(step, lost, result)
            result.post_recovery[step] = pipeline.evaluate(val)
        x, y = _batch(
            train_data, batch_size=config.batch_size, context=sc.context, generator=data_gen
        )
        result.train_losses.append(pipeline.train_step(step, x, y))
        if (step + 1) % config.eval_every == 0 or step + 1 == config.num_steps:
            result.eval_steps.append(step + 1)
            result.eval_losses.append(pipeline.evaluate(val))
    result.seconds = time.perf_counter() - start
    return result
