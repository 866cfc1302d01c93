"""Outer loops: DiLoCo, async DiLoCo, Streaming DiLoCo, CO2, delayed Nesterov.

``DiLoCo`` wraps a model and its inner optimizer and runs the configured outer loop over a
communicator (``lowcomm.comm.Communicator``, or ``SoloCommunicator`` / ``LocalGroup`` in one
process). ``OuterConfig`` selects the method and its parameters. The update rules themselves are
pure functions (``nesterov_step``, ``co2_step``, ...) usable on their own.
"""

from __future__ import annotations

from lowcomm.diloco._rules import (
    co2_step,
    delayed_nesterov_step,
    dynamic_local_steps,
    eager_correction,
    nesterov_step,
    streaming_merge,
)
from lowcomm.diloco._seam import AllReduceHandle, OuterComm
from lowcomm.diloco.config import METHODS, QUANTIZATIONS, OuterConfig
from lowcomm.diloco.local import LocalGroup, SoloCommunicator
from lowcomm.diloco.trainer import DiLoCo, OuterStats

__all__ = [
    "METHODS",
    "QUANTIZATIONS",
    "AllReduceHandle",
    "DiLoCo",
    "LocalGroup",
    "OuterComm",
    "OuterConfig",
    "OuterStats",
    "SoloCommunicator",
    "co2_step",
    "delayed_nesterov_step",
    "dynamic_local_steps",
    "eager_correction",
    "nesterov_step",
    "streaming_merge",
]
