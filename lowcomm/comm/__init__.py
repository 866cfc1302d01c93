"""The WAN collective layer: master, communicator, ring all-reduce, shared state."""

from __future__ import annotations

from lowcomm.comm._shaper import Shaper
from lowcomm.comm.backend import CommBackend, open_communicator
from lowcomm.comm.communicator import AllReduceInfo, CommConfig, Communicator, Handle
from lowcomm.comm.errors import (
    AuthenticationError,
    BackendUnavailableError,
    CommError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
    TopologyError,
    TruncatedFrameError,
)
from lowcomm.comm.master import Master
from lowcomm.comm.pccl import PcclCommunicator, PcclMaster
from lowcomm.comm.ring import PeerListener, Ring, RingStats, connect_ring
from lowcomm.comm.shared_state import SharedState, SyncInfo

__all__: list[str] = [
    "AllReduceInfo",
    "AuthenticationError",
    "BackendUnavailableError",
    "CommBackend",
    "CommConfig",
    "CommError",
    "CommTimeoutError",
    "Communicator",
    "Handle",
    "Master",
    "PcclCommunicator",
    "PcclMaster",
    "PeerFailureError",
    "PeerListener",
    "ProtocolError",
    "Ring",
    "RingStats",
    "Shaper",
    "SharedState",
    "SyncInfo",
    "TopologyError",
    "TruncatedFrameError",
    "connect_ring",
    "open_communicator",
]
