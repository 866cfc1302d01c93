"""The small seam the outer loops need from a communicator, as Protocols.

``lowcomm.comm.Communicator`` satisfies it; so do the in-process groups in
``lowcomm.testing.groups`` (one peer, or several peers simulated by threads of one process).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["AllReduceHandle", "OuterComm"]


class AllReduceHandle(Protocol):
    """An all-reduce in flight. ``wait`` blocks until the result is in the tensor that was given.

    On failure ``wait`` raises a ``LowcommError`` (``PeerFailureError`` / ``CommTimeoutError`` for
    the real communicator and the in-process groups) and the tensor is left untouched.
    """

    def wait(self, *, timeout_s: float | None = ...) -> Any: ...


class OuterComm(Protocol):
    """What ``lowcomm.diloco.DiLoCo`` calls on its communicator; every peer makes the same calls."""

    @property
    def world_size(self) -> int: ...

    def all_reduce_async(
        self,
        tensor: torch.Tensor,
        op: str = ...,
        *,
        quantization: Any = ...,
        tag: int = ...,
        timeout_s: float = ...,
        stamp: dict[str, int] | None = ...,
        check_finite: bool = ...,
    ) -> AllReduceHandle: ...

    def sync_shared_state(
        self, state: Any, strategy: str = ..., *, timeout_s: float = ...
    ) -> Any: ...

    def are_peers_pending(self, *, timeout_s: float = ...) -> bool: ...

    def update_topology(self, *, timeout_s: float = ...) -> Any: ...
