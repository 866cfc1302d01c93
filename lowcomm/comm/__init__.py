"""The WAN collective layer: master, communicator, ring all-reduce, shared state."""

from __future__ import annotations

from lowcomm.comm._ops import DTYPES, OPS, check_all_reduce_args
from lowcomm.comm._ring_setup import connect_ring
from lowcomm.comm.backend import CommBackend, open_communicator
from lowcomm.comm.communicator import (
    AllReduceInfo,
    CommConfig,
    Communicator,
    Handle,
    VoteResult,
)
from lowcomm.comm.errors import (
    AuthenticationError,
    BackendUnavailableError,
    CommError,
    CommTimeoutError,
    NonFiniteError,
    PeerFailureError,
    ProtocolError,
    StaleStateError,
    TopologyError,
    TruncatedFrameError,
)
from lowcomm.comm.listener import PeerListener
from lowcomm.comm.master import Master
from lowcomm.comm.pccl import PcclCommunicator, PcclMaster
from lowcomm.comm.ring import Ring, RingStats
from lowcomm.comm.shaper import Shaper
from lowcomm.comm.shared_state import SharedState, SyncInfo

__all__: list[str] = [
    "DTYPES",
    "OPS",
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
    "NonFiniteError",
    "PcclCommunicator",
    "PcclMaster",
    "PeerFailureError",
    "PeerListener",
    "ProtocolError",
    "Ring",
    "RingStats",
    "Shaper",
    "SharedState",
    "StaleStateError",
    "SyncInfo",
    "TopologyError",
    "TruncatedFrameError",
    "VoteResult",
    "check_all_reduce_args",
    "connect_ring",
    "open_communicator",
]
