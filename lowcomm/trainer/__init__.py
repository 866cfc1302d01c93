"""The trainer layer: what a torchrun script calls to join a run (``init``, ``RunConfig``, ``Run``)
and ``Trainer``, the outer loop with checkpointing, restore and rejoin built in.

``lowcomm.init()`` turns each torchrun rank into a lowcomm peer of its replica, admitted with the
replica's other ranks as one unit; see ``lowcomm.trainer.runtime`` and ``lowcomm.trainer.trainer``.
"""

from __future__ import annotations

from lowcomm.trainer.runtime import ENV, Run, RunConfig, init
from lowcomm.trainer.trainer import Trainer

__all__ = ["ENV", "Run", "RunConfig", "Trainer", "init"]
