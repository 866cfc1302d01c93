"""The WAN collective layer: master, communicator, ring all-reduce, shared state."""

from __future__ import annotations

from lowcomm.comm._pccl_backend import BackendUnavailableError, PcclMaster
from lowcomm.comm.communicator import AllReduceInfo, CommConfig, Communicator, Handle
from lowcomm.comm.master import Master
from lowcomm.comm.shared_state import SharedState, SyncInfo

__all__: list[str] = [
    "AllReduceInfo",
    "BackendUnavailableError",
    "CommConfig",
    "Communicator",
    "Handle",
    "Master",
    "PcclMaster",
    "SharedState",
    "SyncInfo",
]
