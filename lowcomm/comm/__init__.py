"""The WAN collective layer: master, communicator, ring all-reduce, shared state."""

from __future__ import annotations

from lowcomm.comm._pccl_backend import BackendUnavailableError, PcclMaster
from lowcomm.comm._ring_setup import connect_ring
from lowcomm.comm.communicator import AllReduceInfo, CommConfig, Communicator, Handle
from lowcomm.comm.errors import (
    AuthenticationError,
    CommError,
    CommTimeoutError,
    PeerFailureError,
    ProtocolError,
    TopologyError,
    TruncatedFrameError,
)
from lowcomm.comm.listener import PeerListener
from lowcomm.comm.master import Master
from lowcomm.comm.ring import Ring, RingStats
from lowcomm.comm.shaper import Shaper
from lowcomm.comm.shared_state import SharedState, SyncInfo

__all__: list[str] = [
    "AllReduceInfo",
    "AuthenticationError",
    "BackendUnavailableError",
    "CommConfig",
    "CommError",
    "CommTimeoutError",
    "Communicator",
    "Handle",
    "Master",
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
]
