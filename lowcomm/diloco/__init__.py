"""Outer loops: DiLoCo, async DiLoCo, Streaming DiLoCo, CO2, delayed Nesterov.

``DiLoCo`` wraps a model and its inner optimizer and runs the configured outer loop over a
communicator (``lowcomm.comm.Communicator``, or ``lowcomm.testing``'s ``SoloCommunicator`` /
``LocalGroup`` in one process). ``OuterConfig`` selects the method and its parameters. The update rules themselves are
pure functions (``nesterov_step``, ``co2_step``, ...) usable on their own.
"""

from __future__ import annotations

from lowcomm.diloco._outer_comm import AllReduceHandle, OuterComm
from lowcomm.diloco._rules import (
    co2_step,
    delayed_nesterov_step,
    dynamic_local_steps,
    eager_correction,
    nesterov_step,
    streaming_merge,
)
from lowcomm.diloco.config import METHODS, QUANTIZATIONS, OuterConfig
from lowcomm.diloco.trainer import DiLoCo, OuterStats

__all__ = [
    "METHODS",
    "QUANTIZATIONS",
    "AllReduceHandle",
    "DiLoCo",
    "OuterComm",
    "OuterConfig",
    "OuterStats",
    "co2_step",
    "delayed_nesterov_step",
    "dynamic_local_steps",
    "eager_correction",
    "nesterov_step",
    "streaming_merge",
]
