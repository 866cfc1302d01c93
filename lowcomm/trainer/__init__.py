"""The trainer layer: ``Trainer`` (an outer loop with checkpointing, restore and rejoin built in)
and, from ``runtime``, ``init()`` for torchrun scripts."""

from __future__ import annotations

from lowcomm.trainer.trainer import Trainer

__all__ = ["Trainer"]
