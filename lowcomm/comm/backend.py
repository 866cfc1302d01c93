"""The communicator seam: the ``CommBackend`` Protocol both backends implement, and the factory.

``open_communicator(address, backend="tcp")`` makes lowcomm's own TCP ``Communicator`` (the
default: runs wherever PyTorch does, with a run token, point-to-point and the commit vote);
``backend="pccl"`` makes a ``PcclCommunicator`` over the real PCCL where its wheel loads (see
``lowcomm.comm.pccl`` for what differs). Code that trains (``DiLoCo``) depends only on
``CommBackend``, so the in-process groups of ``lowcomm.testing`` stand in for either.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lowcomm.comm._worker import Handle
from lowcomm.comm.communicator import AllReduceInfo, CommConfig, Communicator
from lowcomm.comm.pccl import PcclCommunicator
from lowcomm.comm.shared_state import SharedState, SyncInfo
from lowcomm.compression import Codec

__all__ = ["BACKENDS", "CommBackend", "open_communicator"]

BACKENDS = ("tcp", "pccl")


@runtime_checkable
class CommBackend(Protocol):
    """The public surface of a communicator, whichever transport carries it.

    Every peer of a run makes the same sequence of phase calls (``connect``, then any of
    ``are_peers_pending``/``update_topology``/``all_reduce``/``sync_shared_state`` in the same
    order); see ``lowcomm.comm.communicator`` for the programming model and the failure contract.
    Every blocking call takes a ``timeout_s`` (None: the backend's ``CommConfig.timeout_s``).
    """

    backend: str
    peer_id: str
    peer_group: int

    @property
    def world_size(self) -> int: ...

    @property
    def peer_group_world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    @property
    def peers(self) -> list[str]: ...

    @property
    def config_blob(self) -> bytes: ...

    def connect(self, timeout_s: float | None = None) -> None: ...

    def close(self, timeout_s: float = 5.0) -> None: ...

    def are_peers_pending(self, timeout_s: float | None = None) -> bool: ...

    def update_topology(self, timeout_s: float | None = None) -> None: ...

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        out: torch.Tensor | None = None,
        quantization: str | Codec | None = None,
        tag: int = 0,
        timeout_s: float | None = None,
        check_finite: bool = False,
    ) -> AllReduceInfo: ...

    def all_reduce_async(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        out: torch.Tensor | None = None,
        quantization: str | Codec | None = None,
        tag: int = 0,
        timeout_s: float | None = None,
        check_finite: bool = False,
    ) -> Handle: ...

    def all_reduce_with_retry(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        out: torch.Tensor | None = None,
        quantization: str | Codec | None = None,
        tag: int = 0,
        timeout_s: float | None = None,
        max_attempts: int = 3,
        check_finite: bool = False,
    ) -> AllReduceInfo: ...

    def sync_shared_state(
        self,
        state: SharedState,
        strategy: str = "enforce_popular",
        *,
        timeout_s: float | None = None,
    ) -> SyncInfo: ...

    def send(
        self, tensor: torch.Tensor, *, to: str, tag: int = 0, timeout_s: float | None = None
    ) -> None: ...

    def recv(
        self, out: torch.Tensor, *, from_: str, tag: int = 0, timeout_s: float | None = None
    ) -> torch.Tensor: ...

    def send_async(
        self, tensor: torch.Tensor, *, to: str, tag: int = 0, timeout_s: float | None = None
    ) -> Handle: ...

    def recv_async(
        self, out: torch.Tensor, *, from_: str, tag: int = 0, timeout_s: float | None = None
    ) -> Handle: ...


def open_communicator(
    master_address: str | tuple[str, int],
    *,
    backend: str = "tcp",
    peer_group: int = 0,
    token: bytes | str | None = None,
    config: CommConfig | None = None,
) -> CommBackend:
    """A communicator of the chosen backend, not yet connected (call ``connect()``).

    Args:
        master_address: ``"host:port"`` of the run's master (a ``Master`` for ``"tcp"``, a
            ``PcclMaster`` for ``"pccl"``: the two speak different protocols).
        backend: ``"tcp"`` (lowcomm's own, default) or ``"pccl"``.
        peer_group, token, config: see ``Communicator``.

    Raises:
        ValueError: an unknown backend or a bad argument.
        BackendUnavailableError: ``"pccl"`` was asked for and PCCL does not load here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pccl":
        return PcclCommunicator(master_address, peer_group=peer_group, token=token, config=config)
    return Communicator(master_address, peer_group=peer_group, token=token, config=config)
