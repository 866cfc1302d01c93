"""The trainer layer: what a torchrun script calls to join a run (``init``, ``RunConfig``, ``Run``).

``lowcomm.init()`` turns each torchrun rank into a lowcomm peer of its replica, admitted with the
replica's other ranks as one unit; see ``lowcomm.trainer.runtime``.
"""

from __future__ import annotations

from lowcomm.trainer.runtime import ENV, Run, RunConfig, init

__all__ = ["ENV", "Run", "RunConfig", "init"]
