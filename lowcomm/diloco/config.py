"""The outer-loop configuration: which DiLoCo-family method, how often, and what travels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DEFAULT_APPLY_DIVISOR",
    "DEFAULT_OUTER",
    "METHODS",
    "QUANTIZATIONS",
    "SLOW_INNER_BETA2",
    "SLOW_INNER_MAX_MOMENTUM",
    "OuterConfig",
]

Method = Literal["diloco", "async", "streaming", "co2", "delayed_nesterov"]
METHODS: tuple[str, ...] = ("diloco", "async", "streaming", "co2", "delayed_nesterov")
QUANTIZATIONS: tuple[str, ...] = ("none", "fp16", "bf16", "uint8", "int8", "fp8", "fp4", "topk")
OnFailure = Literal["retry", "drop"]
# Outer momentum above this, with an inner Adam whose beta2 is above SLOW_INNER_BETA2, is unsafe:
# measured with torch's default AdamW (docs/outer_loop_defaults.md), momentum 0.5 closed 51% of
# the one-worker/data-parallel gap and 0.9 ended worse than one worker.
SLOW_INNER_MAX_MOMENTUM = 0.5
SLOW_INNER_BETA2 = 0.99
# Each method's default (outer lr, outer momentum), measured at the calibration setting (docs/
# outer_loop_defaults.md: 4 replicas, H=50, uint8, 1200 steps, inner LMAdamW with its 100-step
# warm-up, against one worker with the same warm-up and seed). Synchronous DiLoCo and Streaming
# keep the paper's Nesterov lr 0.7 momentum 0.9 (Streaming 0.883x one worker). The one-round-stale
# methods lost to one worker with a full round of delay whatever the outer step (eager async lr
# 0.7 without momentum 1.030x, momentum 0.5 1.049x, lr 1.4 1.247x; delayed Nesterov lr 0.7
# momentum 0.9 diverged); applied a tenth of a round late (DEFAULT_APPLY_DIVISOR) the paper's
# Nesterov lr 0.7 momentum 0.9 wins: 0.974x, 0.983x, 0.977x one worker (seeds 0-2). Delayed
# Nesterov with dn_period 1 is that step bit for bit; CO2 keeps momentum 0 (its heavy-ball
# momentum is not Nesterov's, and unmeasured with the early apply): then it is async without
# momentum, 0.993x and 0.995x (seeds 0, 1).
DEFAULT_OUTER: dict[str, tuple[float, float]] = {
    "diloco": (0.7, 0.9),
    "streaming": (0.7, 0.9),
    "async": (0.7, 0.9),
    "co2": (0.7, 0.0),
    "delayed_nesterov": (0.7, 0.9),
}
# The one-round-stale methods apply each round's average 1/DEFAULT_APPLY_DIVISOR of a round into
# the next (``apply_after_steps`` left None: max(1, sync_every // 10) inner steps, 5 at H=50), not
# at its end: staleness, not the update rule, is what made them lose to one worker (docs/
# outer_loop_defaults.md). ``apply_after_steps=sync_every`` keeps the full-round delay.
DEFAULT_APPLY_DIVISOR = 10
# The longest delay (inner steps) measured safe with outer momentum 0.9: 5 at H=50 (part A) and 2
# at H=20 (part B's race); 50 of 50 diverged, 100 of 100 never reached the race's target.
MEASURED_SAFE_DELAY = 5


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """How the outer loop runs. Every peer of a run must use the same config.

    Methods (docs/algorithms.md sections 1-3):
        ``"diloco"``: synchronous DiLoCo; every ``sync_every`` inner steps the pseudo-gradients are
            averaged and applied with outer Nesterov SGD (``outer_lr``, ``outer_momentum``).
        ``"async"``: one-step-delayed DiLoCo (PCCL/prime): round k's all-reduce runs while round
            k+1's inner steps do; its result is applied at the end of round k+1. With eager updates
            (``eager``, on by default) each peer's own fresh pseudo-gradient replaces its stale
            share; ``eager=False`` is PCCL's naive delay. ``apply_after_steps=tau`` applies round
            k's average after tau inner steps of round k+1 instead of at its end (waiting there if
            the all-reduce is still running) and shifts the local parameters by the change of the
            round's starting point, so no inner progress is lost: staleness drops from H inner
            steps to tau. Left None it is ``sync_every // DEFAULT_APPLY_DIVISOR`` (at least 1) (5 inner steps
            at H=50; measured: a full round of delay ends worse than one worker); pick tau just
            above the all-reduce time over the inner-step time on a slow link, and
            ``sync_every`` for the full-round delay (the whole round hides the all-reduce).
            The same schedule holds for co2 and delayed_nesterov.
        ``"streaming"``: Streaming DiLoCo; the parameters are split into ``num_fragments``
            fragments, one synced every ``sync_every // num_fragments`` inner steps, each all-reduce
            overlapping ``overlap_steps`` inner steps, then merged with factor ``merge_alpha``.
        ``"co2"``: CO2; one-round-stale heavy-ball outer step with the staleness gap penalty
            ``co2_gap_penalty`` (>= 1) and element-wise outer momentum clipping ``co2_clip``.
        ``"delayed_nesterov"``: the one-step-delayed pipeline with the delayed Nesterov rule
            (momentum updated every ``dn_period`` outer steps) and, if ``dynamic_local_steps``,
            each peer's inner steps per round scaled by its speed (DyLU).

    Wire format: ``quantization`` names a ``lowcomm.compression`` codec for the pseudo-gradients
    (``"uint8"`` by default; ``"none"`` sends fp32). ``"topk"`` always runs with error feedback.

    Failures: with ``on_failure="retry"`` a round whose all-reduce fails is redone among the
    survivors (at most ``max_retries`` times) before it is dropped; a dropped round keeps every
    peer's local progress, which the next round's pseudo-gradient then carries.
    """

    method: Method = "diloco"
    sync_every: int = 50
    # None: the method's entry of DEFAULT_OUTER (lr, momentum), chosen from measurements.
    outer_lr: float | None = None
    outer_momentum: float | None = None
    nesterov: bool = True
    quantization: str = "uint8"
    topk_fraction: float = 0.05
    # async
    # None: True for async. Measured (benchmarks/diloco.py setting, 4 peers, H=20, 1000 steps):
    # eager 1.906 against naive delay's 2.131 and sync's 1.809 validation loss.
    eager: bool | None = None
    apply_after_steps: int | None = None
    # streaming
    num_fragments: int = 3
    overlap_steps: int = 1
    merge_alpha: float = 0.5
    # co2
    co2_gap_penalty: float = 1.0
    co2_clip: float | None = 1.0
    # delayed nesterov / DyLU
    dn_period: int = 1
    dynamic_local_steps: bool = False
    min_local_steps: int = 1
    # runtime
    outer_device: str = "cpu"
    timeout_s: float = 600.0
    on_failure: OnFailure = "retry"
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"OuterConfig.method must be one of {METHODS}, got {self.method!r}")
        lr, momentum = DEFAULT_OUTER[self.method]
        if self.outer_lr is None:
            object.__setattr__(self, "outer_lr", lr)
        if self.outer_momentum is None:
            object.__setattr__(self, "outer_momentum", momentum)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"OuterConfig.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.sync_every < 1:
            raise ValueError(f"OuterConfig.sync_every must be >= 1, got {self.sync_every}")
        for name in ("outer_lr", "timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"OuterConfig.{name} must be finite and > 0, got {value}")
        for name in ("outer_momentum", "merge_alpha"):
            value = getattr(self, name)
            assert value is not None
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"OuterConfig.{name} must be in [0, 1], got {value}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ValueError(
                f"OuterConfig.topk_fraction must be in (0, 1], got {self.topk_fraction}"
            )
        if self.eager is None:
            object.__setattr__(self, "eager", self.is_pipelined)
        if self.apply_after_steps is not None:
            if not self.is_pipelined:
                raise ValueError(
                    "OuterConfig.apply_after_steps applies to the one-step-delayed methods "
                    "(async, co2, delayed_nesterov) only"
                )
            if not 1 <= self.apply_after_steps <= self.sync_every:
                raise ValueError(
                    f"OuterConfig.apply_after_steps must be in [1, sync_every = {self.sync_every}],"
                    f" got {self.apply_after_steps}"
                )
        elif self.is_pipelined:
            tau = max(1, self.sync_every // DEFAULT_APPLY_DIVISOR)
            object.__setattr__(self, "apply_after_steps", tau)
        if self.eager and not self.is_pipelined:
            raise ValueError(
                "OuterConfig.eager applies to the one-step-delayed methods (async, co2, "
                "delayed_nesterov) only"
            )
        if self.num_fragments < 1:
            raise ValueError(f"OuterConfig.num_fragments must be >= 1, got {self.num_fragments}")
        if self.method == "streaming":
            # One fragment every sync_every // num_fragments inner steps, so each fragment syncs
            # every num_fragments * (sync_every // num_fragments) <= sync_every inner steps (the
            # defaults, 50 and 3, give 48: the defaults must be a valid config).
            if self.sync_every < self.num_fragments:
                raise ValueError(
                    f"OuterConfig.sync_every ({self.sync_every}) must be >= num_fragments "
                    f"({self.num_fragments}) for method='streaming'"
                )
            spacing = self.sync_every // self.num_fragments
            if not 0 <= self.overlap_steps < spacing:
                raise ValueError(
                    f"OuterConfig.overlap_steps must be in [0, sync_every/num_fragments = {spacing}),"
                    f" got {self.overlap_steps}"
                )
        if not (math.isfinite(self.co2_gap_penalty) and self.co2_gap_penalty >= 1.0):
            raise ValueError(
                f"OuterConfig.co2_gap_penalty must be >= 1, got {self.co2_gap_penalty}"
            )
        if self.co2_clip is not None and not (math.isfinite(self.co2_clip) and self.co2_clip > 0):
            raise ValueError(f"OuterConfig.co2_clip must be > 0 or None, got {self.co2_clip}")
        if self.dn_period < 1:
            raise ValueError(f"OuterConfig.dn_period must be >= 1, got {self.dn_period}")
        if not 1 <= self.min_local_steps <= self.sync_every:
            raise ValueError(
                f"OuterConfig.min_local_steps must be in [1, sync_every], got {self.min_local_steps}"
            )
        if self.dynamic_local_steps and self.method != "delayed_nesterov":
            raise ValueError("OuterConfig.dynamic_local_steps applies to method='delayed_nesterov'")
        if self.on_failure not in ("retry", "drop"):
            raise ValueError(
                f"OuterConfig.on_failure must be 'retry' or 'drop', got {self.on_failure!r}"
            )
        if self.max_retries < 0:
            raise ValueError(f"OuterConfig.max_retries must be >= 0, got {self.max_retries}")

    def inner_optimizer_warning(self, optimizer: Any) -> str | None:
        """Why this outer loop's momentum is unsafe with ``optimizer``, or None if it is not.

        Outer momentum above ``SLOW_INNER_MAX_MOMENTUM`` needs an inner optimizer whose step
        adapts quickly: with an Adam-family second-moment decay above ``SLOW_INNER_BETA2`` (torch's
        AdamW default is 0.999) the pseudo-gradients stay large and aligned round after round and
        the momentum overshoots (docs/outer_loop_defaults.md: outer momentum 0.9 ends worse than
        one worker there). ``DiLoCo`` logs this once at construction.
        """
        momentum = self.outer_momentum or 0.0
        if momentum <= SLOW_INNER_MAX_MOMENTUM:
            return None
        for group in getattr(optimizer, "param_groups", ()):
            betas = group.get("betas")
            if isinstance(betas, tuple | list) and len(betas) == 2 and betas[1] > SLOW_INNER_BETA2:
                return (
                    f"outer momentum {momentum} with an inner optimizer of beta2 {betas[1]} "
                    f"(> {SLOW_INNER_BETA2}) overshoots: use betas (0.9, 0.95) (lowcomm.launch."
                    f"experiments.LMAdamW) or outer_momentum <= {SLOW_INNER_MAX_MOMENTUM}"
                )
        return None

    def staleness_warning(self) -> str | None:
        """Why this one-round-stale schedule is unsafe, or None if it is not.

        Applied more than half a round and more than ``MEASURED_SAFE_DELAY`` inner steps late,
        outer momentum above ``SLOW_INNER_MAX_MOMENTUM`` compounds the staleness: measured with a
        full round of delay (docs/outer_loop_defaults.md), momentum 0.9 diverged and 0.5 lost to
        one worker by more than momentum 0 did. A default config is never flagged. ``DiLoCo``
        logs this once at construction.
        """
        momentum = self.outer_momentum or 0.0
        tau = self.apply_after_steps
        if not self.is_pipelined or tau is None or momentum <= SLOW_INNER_MAX_MOMENTUM:
            return None
        if 2 * tau <= self.sync_every or tau <= MEASURED_SAFE_DELAY:
            return None
        return (
            f"outer momentum {momentum} on a pseudo-gradient applied {tau} of {self.sync_every} "
            f"inner steps late diverged when measured: use outer_momentum=0 with that delay, or "
            f"leave apply_after_steps at its default ({max(1, self.sync_every // DEFAULT_APPLY_DIVISOR)})"
        )

    @property
    def is_pipelined(self) -> bool:
        """Whether round k's all-reduce overlaps round k+1's inner steps (one-step delay)."""
        return self.method in ("async", "co2", "delayed_nesterov")
