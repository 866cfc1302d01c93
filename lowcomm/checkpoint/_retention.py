"""Retention: which committed checkpoints a level keeps (the newest N plus every k-th step)."""

from __future__ import annotations

import logging

from lowcomm.checkpoint.levels import StorageLevel

logger = logging.getLogger(__name__)

__all__ = ["keep_steps", "prune"]


def keep_steps(steps: list[int], *, keep_last: int, keep_every: int | None) -> set[int]:
    """The steps to keep of ``steps`` (oldest first): the last ``keep_last``, and every step
    divisible by ``keep_every`` (None: none)."""
    keep = set(steps[-keep_last:])
    if keep_every is not None:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def prune(level: StorageLevel, *, committed: int, keep_last: int, keep_every: int | None) -> None:
    """Delete ``level``'s committed steps outside the retention policy, and its partial steps below
    the just-committed ``committed`` (dead writes of a crashed or failed save: every rank finished
    them before this commit). Called by rank 0 only, after each commit at the level. Never raises:
    a failure is logged and retried after the next commit."""
    try:
        steps = level.steps()
        keep = keep_steps(steps, keep_last=keep_last, keep_every=keep_every)
        for s in steps:
            if s not in keep:
                level.delete(s)
        for s in level.partial_steps():
            if s < committed:
                level.delete(s)
    except Exception as e:  # remote errors come in many types (botocore, aiohttp)
        logger.warning("%s retention failed (will retry after the next commit): %s", level.name, e)
