"""The outer-loop update rules as pure, in-place functions over flat fp32 tensors.

Every rule here is elementwise (or a per-tensor reduction) so it can run on a CPU copy of the
outer parameters, on one FSDP shard, or on one Streaming DiLoCo fragment alike. Notation follows
docs/algorithms.md sections 1-3: theta = outer parameters, delta = pseudo-gradient
(theta_start - theta_end), b / m = outer momentum. Signs follow ``torch.optim.SGD(nesterov=True)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "co2_step",
    "delayed_nesterov_step",
    "dynamic_local_steps",
    "eager_correction",
    "nesterov_step",
    "streaming_merge",
]


@torch.no_grad()
def nesterov_step(
    theta: torch.Tensor,
    momentum: torch.Tensor,
    delta: torch.Tensor,
    *,
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> None:
    """DiLoCo's outer step: ``b <- mu*b + delta; theta <- theta - lr*(delta + mu*b)`` (in place).

    With ``nesterov=False`` it is heavy-ball SGD (``theta <- theta - lr*b``); with ``mu=0`` both
    reduce to ``theta <- theta - lr*delta``, so ``lr=1, mu=0`` lands exactly on the averaged local
    parameters (up to the rounding of ``theta - (theta - x)``).
    """
    momentum.mul_(mu).add_(delta)
    if nesterov:
        theta.sub_(delta.add(momentum, alpha=mu), alpha=lr)
    else:
        theta.sub_(momentum, alpha=lr)


@torch.no_grad()
def co2_step(
    theta: torch.Tensor,
    momentum: torch.Tensor,
    delta: torch.Tensor,
    *,
    lr: float,
    beta: float,
    gap_penalty: float,
    clip: float | None,
) -> None:
    """CO2's outer step on a one-round-stale pseudo-gradient (in place).

    ``m <- clip(beta*m + delta/gap_penalty, [-clip, clip]); theta <- theta - lr*m``. The clip is
    element-wise and its result is stored (the released CO2 code computes ``torch.clamp`` and
    throws the result away, so there clipping is a no-op); ``clip=None`` disables it.
    """
    momentum.mul_(beta).add_(delta, alpha=1.0 / gap_penalty)
    if clip is not None:
        momentum.clamp_(-clip, clip)
    theta.sub_(momentum, alpha=lr)


@torch.no_grad()
def delayed_nesterov_step(
    theta: torch.Tensor,
    momentum: torch.Tensor,
    buffer: torch.Tensor,
    delta: torch.Tensor,
    *,
    count: int,
    period: int,
    lr: float,
    mu: float,
) -> int:
    """Delayed Nesterov (Liu et al. 2024, Algorithm 3) for one incoming pseudo-gradient; in place.

    ``count`` is the number of pseudo-gradients applied so far; returns the new count. Every
    ``period``-th one updates the momentum with the mean of the buffered ones and applies
    ``lr*(delta/period + mu*m)``; the others apply ``lr*delta/period`` only. Over ``period``
    pseudo-gradients this equals one Nesterov step on their mean, so one stale pseudo-gradient never
    gets amplified by the momentum. ``period=1`` is plain Nesterov (with ``lr`` scaled by 1).
    """
    count += 1
    buffer.add_(delta)
    if count % period == 0:
        momentum.mul_(mu).add_(buffer, alpha=1.0 / period)
        theta.sub_(delta.div(period).add_(momentum, alpha=mu), alpha=lr)
        buffer.zero_()
    else:
        theta.sub_(delta, alpha=lr / period)
    return count


@torch.no_grad()
def eager_correction(
    own_fresh: torch.Tensor,
    own_stale: torch.Tensor | None,
    *,
    num_peers: int,
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> torch.Tensor:
    """How far an eager peer starts its next round from the shared (one-step-delayed) outer params.

    Eager updates (Kale et al. 2025) replace this peer's stale share of the delayed average with
    its fresh one: ``delta_hat = avg_{t-1} + (fresh - stale)/M``. Because the Nesterov step is
    linear in the pseudo-gradient, applying it to ``delta_hat`` differs from applying it to
    ``avg_{t-1}`` by ``-lr*(1+mu)*(fresh - stale)/M`` (``-lr*(fresh - stale)/M`` without Nesterov).
    The shared outer state keeps using the true averages, so it stays bit-identical on every peer;
    only the local starting point moves. Returns a new tensor.
    """
    diff = own_fresh.clone() if own_stale is None else own_fresh - own_stale
    scale = lr * (1.0 + mu if nesterov else 1.0) / num_peers
    return diff.mul_(-scale)


@torch.no_grad()
def streaming_merge(local: torch.Tensor, theta: torch.Tensor, *, alpha: float) -> None:
    """Streaming DiLoCo's merge: ``local <- alpha*local + (1-alpha)*theta`` (in place).

    ``alpha=0`` discards the inner steps taken while the fragment was in flight; the paper uses 0.5.
    """
    local.lerp_(theta, 1.0 - alpha)


def dynamic_local_steps(
    sync_every: int, *, own_speed: float, max_speed: float, min_steps: int = 1
) -> int:
    """DyLU: a peer's inner steps for the next round, ``floor(H * v / max_v)``, at least ``min_steps``.

    Slow peers do fewer inner steps so that every peer reaches the outer step at about the same
    time. Speeds are steps per second; a non-positive or non-finite speed raises ValueError.
    """
    if not (math.isfinite(own_speed) and math.isfinite(max_speed)) or own_speed <= 0:
        raise ValueError(f"speeds must be finite and positive, got {own_speed} / {max_speed}")
    if max_speed < own_speed:
        raise ValueError(f"max_speed {max_speed} is below this peer's speed {own_speed}")
    return max(min_steps, min(sync_every, math.floor(sync_every * own_speed / max_speed)))
