"""The ``CommBackend`` API over the real PCCL (PyPI ``pypccl``): ``open_communicator(..., backend="pccl")``.

PCCL's wheel loads only on CPython 3.12 with glibc >= 2.38 (Ubuntu 24.04, for example); elsewhere
``open_communicator(..., backend="pccl")`` raises ``BackendUnavailableError`` saying why. The run needs
a PCCL master (``PcclMaster``), not lowcomm's: the two speak different protocols.

What differs from the default ``"tcp"`` backend, because PCCL itself does not offer it:

- No run token: PCCL has no admission control (a token passed in is ignored, with a warning).
- No ``send``/``recv`` (they raise ``BackendUnavailableError``: use the tcp backend), no
  ``config_blob`` (always ``b""``), ``rank`` is -1 and ``peers`` empty (PCCL exposes neither).
- Timeouts are enforced around PCCL's blocking calls: a call past ``timeout_s`` raises
  ``CommTimeoutError``, but PCCL keeps blocking inside (its SIGSTOP and lockstep hangs), so later
  calls on that communicator queue behind it and time out too.
- Quantization: ``"uint8"`` maps to PCCL's own uint8 min-max quantizer; codec objects are refused.

Collectives run on one worker thread in submission order, as on the default backend; results go
to a scratch buffer and are copied into the caller's tensor only on success.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from lowcomm.comm._ops import check_all_reduce_args, has_nonfinite
from lowcomm.comm._protocol import parse_address
from lowcomm.comm._worker import Handle, TaskQueue, all_reduce_with_retry, deadline_after
from lowcomm.comm.communicator import AllReduceInfo, CommConfig
from lowcomm.comm.errors import (
    BackendUnavailableError,
    CommError,
    NonFiniteError,
    PeerFailureError,
    TopologyError,
)
from lowcomm.comm.shared_state import SharedState, SyncInfo, validate_strategy
from lowcomm.compression import Codec

__all__ = ["BackendUnavailableError", "PcclCommunicator", "PcclMaster", "pccl_unavailable_reason"]

T = TypeVar("T")
_NO_P2P = "the pccl backend has no point-to-point send/recv: use open_communicator(backend='tcp')"

logger = logging.getLogger(__name__)


def pccl_unavailable_reason() -> str | None:
    """None if ``import pccl`` works here, else why not (for skips and errors)."""
    try:
        import pccl  # noqa: F401
    except Exception as e:  # ImportError, OSError from the native library, PCCLError at init
        return (
            f"the pccl backend needs PyPI 'pypccl' (CPython 3.12, glibc >= 2.38); "
            f"'import pccl' failed here: {type(e).__name__}: {e}"
        )
    return None


def _pccl() -> Any:
    reason = pccl_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(reason)
    import pccl  # an optional native dependency: imported only where it is asked for

    return pccl


def _to_ip_address(address: tuple[str, int]) -> str:
    host, port = address
    # PCCL takes a literal IP address, not a host name.
    return f"{socket.gethostbyname(host)}:{port}"


class PcclMaster:
    """A PCCL master node with lowcomm's ``Master`` lifecycle (``start``/``address``/``stop``)."""

    def __init__(self, listen: tuple[str, int] | str = ("127.0.0.1", 48148)) -> None:
        self._listen = parse_address(listen)
        if self._listen[1] == 0:
            raise ValueError("PcclMaster needs an explicit port (PCCL cannot report a chosen one)")
        self._node: Any = None

    @property
    def address(self) -> tuple[str, int]:
        return self._listen

    def start(self) -> PcclMaster:
        pccl = _pccl()
        self._node = pccl.MasterNode(_to_ip_address(self._listen))
        self._node.run()
        return self

    def stop(self) -> None:
        if self._node is not None:
            self._node.interrupt()
            node, self._node = self._node, None
            del node  # PCCL's destructor awaits termination


_OPS = {"sum": "SUM", "avg": "AVG", "min": "MIN", "max": "MAX"}


class PcclCommunicator:
    """A peer of a PCCL run, with the ``CommBackend`` API. Made by
    ``open_communicator(..., backend="pccl")``; see the module docstring for what differs from the
    default backend.

    Raises:
        BackendUnavailableError: PCCL does not load here (the message says why).
    """

    backend = "pccl"

    def __init__(
        self,
        master_address: str | tuple[str, int],
        *,
        peer_group: int = 0,
        token: bytes | str | None = None,
        config: CommConfig | None = None,
    ) -> None:
        if not isinstance(peer_group, int) or peer_group < 0:
            raise ValueError(f"peer_group must be an int >= 0, got {peer_group!r}")
        self.master_address = parse_address(master_address)
        self.peer_group = peer_group
        self.config = config or CommConfig()
        self._pccl_mod = _pccl()
        if token is not None:
            logger.warning("the pccl backend has no admission control: the run token is ignored")
        self.peer_id = uuid.uuid4().hex[:12]
        self._comm: Any = None
        self._world_cache = (0, 0)
        self._accepted = False
        self._closed = threading.Event()
        self._worker = TaskQueue(f"lowcomm-pccl-{self.peer_id}", check=self._check_usable)

    # ------------------------------------------------------------------ properties
    @property
    def world_size(self) -> int:
        return self._world_cache[0]

    @property
    def peer_group_world_size(self) -> int:
        return self._world_cache[1]

    @property
    def rank(self) -> int:
        return -1  # PCCL exposes no rank

    @property
    def peers(self) -> list[str]:
        return []

    @property
    def config_blob(self) -> bytes:
        return b""  # PCCL's master hands out no run configuration

    def _check_usable(self) -> None:
        if self._closed.is_set():
            raise TopologyError("the communicator is closed")
        if not self._accepted:
            raise TopologyError("not accepted into the run yet: call connect() first")

    def _submit(self, fn: Callable[[float], T], timeout_s: float | None, what: str) -> Handle:
        self._check_usable()
        return self._worker.submit(fn, deadline_after(timeout_s, self.config.timeout_s), what)

    def _refresh(self) -> None:
        attr = self._pccl_mod.Attribute
        self._world_cache = (
            int(self._comm.get_attribute(attr.GLOBAL_WORLD_SIZE)),
            int(self._comm.get_attribute(attr.LOCAL_WORLD_SIZE)),
        )

    def _map_error(self, e: Exception, what: str) -> CommError:
        result = getattr(getattr(e, "result", None), "name", type(e).__name__)
        msg = f"{what} failed in PCCL ({result})"
        if result in ("RANK_CONNECTION_LOST", "RANK_CONNECTION_FAILED", "MASTER_CONNECTION_FAILED"):
            return PeerFailureError(
                f"{msg}: a peer or the master is gone; retry with the survivors"
            )
        if result in (
            "UPDATE_TOPOLOGY_FAILED",
            "TOO_FEW_PEERS",
            "INVALID_USAGE",
            "PENDING_ASYNC_OPS",
        ):
            return TopologyError(f"{msg}: call update_topology() on every peer and retry")
        return CommError(msg)

    def _call(self, fn: Any, timeout_s: float | None, what: str) -> Any:
        """Runs ``fn()`` on the worker thread, bounded by ``timeout_s``; maps PCCL's errors."""
        pccl_error = self._pccl_mod.PCCLError

        def run(_deadline: float) -> Any:
            try:
                out = fn()
            except pccl_error as e:
                raise self._map_error(e, what) from e
            self._refresh()
            return out

        t = self.config.timeout_s if timeout_s is None else float(timeout_s)
        return self._submit(run, t, what).wait(timeout_s=t + 1.0)

    # ------------------------------------------------------------------ lifecycle
    def connect(self, timeout_s: float | None = None) -> None:
        """Connects to the PCCL master; blocks until accepted (PCCL's ``connect``)."""
        t = self.config.timeout_s if timeout_s is None else float(timeout_s)
        pccl = self._pccl_mod
        self._comm = pccl.Communicator(_to_ip_address(self.master_address), self.peer_group)
        self._accepted = True  # lets the worker run the connect call itself
        self._worker.start()
        try:
            self._call(lambda: self._comm.connect(n_attempts=max(1, int(t))), t, "connect()")
        except BaseException:
            self._accepted = False
            raise

    def close(self, timeout_s: float = 5.0) -> None:
        """Disconnects (PCCL's destructor does); fails collectives not yet started."""
        self._closed.set()
        self._worker.close()
        self._comm = None  # PCCL's destructor disconnects

    def __enter__(self) -> PcclCommunicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ phases
    def are_peers_pending(self, timeout_s: float | None = None) -> bool:
        return bool(
            self._call(lambda: self._comm.are_peers_pending(), timeout_s, "are_peers_pending()")
        )

    def update_topology(self, timeout_s: float | None = None) -> None:
        self._call(lambda: self._comm.update_topology(), timeout_s, "update_topology()")

    def all_reduce_async(
        self,
        tensor: torch.Tensor,
        op: str = "avg",
        *,
        out: torch.Tensor | None = None,
        quantization: str | Codec | None = None,
        tag: int = 0,
        timeout_s: float | None = None,
        stamp: dict[str, int] | None = None,
        check_finite: bool = False,
    ) -> Handle:
        # ``stamp`` is accepted for API parity but not checked: PCCL's master has no payload to
        # compare it in (the TCP backend refuses mismatched stamps).
        check_all_reduce_args(tensor, op, out=out, tag=tag)
        if check_finite and has_nonfinite(tensor):
            # PCCL has no gate to tell the others: they fail when this peer does not join.
            raise NonFiniteError(
                f"all_reduce(tag={tag}): this peer's contribution holds NaN or inf; not sent"
            )
        if quantization not in (None, "uint8"):
            raise ValueError(
                f"the pccl backend supports quantization=None or 'uint8' (PCCL's own), got {quantization!r}"
            )
        pccl = self._pccl_mod

        def run(_deadline: float) -> AllReduceInfo:
            start = time.perf_counter()
            src = tensor.detach().reshape(-1).to("cpu").contiguous()
            recv = torch.empty_like(src)
            quant = (
                pccl.QuantizationOptions(pccl.DataType.UINT8, pccl.QuantizationAlgorithm.MIN_MAX)
                if quantization == "uint8"
                else None
            )
            try:
                info = self._comm.all_reduce(
                    src,
                    recv,
                    op=getattr(pccl.ReduceOp, _OPS[op]),
                    tag=tag,
                    quantization_options=quant,
                )
            except pccl.PCCLError as e:
                raise self._map_error(e, f"all_reduce(tag={tag})") from e
            self._refresh()
            target = out if out is not None else tensor
            with torch.no_grad():
                target.copy_(recv.view(target.shape))
            return AllReduceInfo(
                world_size=int(info.local_world_size),
                tx_bytes=int(info.tx_bytes),
                rx_bytes=int(info.rx_bytes),
                seconds=time.perf_counter() - start,
            )

        return self._submit(run, timeout_s, f"all_reduce(tag={tag})")

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
    ) -> AllReduceInfo:
        t = self.config.timeout_s if timeout_s is None else float(timeout_s)
        handle = self.all_reduce_async(
            tensor,
            op,
            out=out,
            quantization=quantization,
            tag=tag,
            timeout_s=t,
            check_finite=check_finite,
        )
        result: AllReduceInfo = handle.wait(timeout_s=t + 1.0)
        return result

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
    ) -> AllReduceInfo:
        """``all_reduce`` retried after a peer failure or stall, at most ``max_attempts`` times."""
        return all_reduce_with_retry(
            lambda: self.all_reduce(
                tensor,
                op,
                out=out,
                quantization=quantization,
                tag=tag,
                timeout_s=timeout_s,
                check_finite=check_finite,
            ),
            max_attempts=max_attempts,
        )

    def sync_shared_state(
        self,
        state: SharedState,
        strategy: str = "enforce_popular",
        *,
        timeout_s: float | None = None,
    ) -> SyncInfo:
        validate_strategy(strategy)
        pccl = self._pccl_mod
        names = sorted(state.tensors)
        for n in names:
            t = state.tensors[n]
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(
                    f"the pccl backend syncs contiguous CPU tensors only; {n!r} is not"
                )
        infos = [pccl.TensorInfo.from_torch(state.tensors[n], n) for n in names]
        pstate = pccl.SharedState(infos)
        pstate.revision = state.revision
        strat = {
            "enforce_popular": pccl.SharedStateSyncStrategy.ENFORCE_POPULAR,
            "receive_only": pccl.SharedStateSyncStrategy.RECEIVE_ONLY,
            "send_only": pccl.SharedStateSyncStrategy.SEND_ONLY,
        }[strategy]
        info = self._call(
            lambda: self._comm.sync_shared_state(pstate, strat), timeout_s, "sync_shared_state()"
        )
        state.revision = int(pstate.revision)
        return SyncInfo(
            tx_bytes=int(info.tx_bytes), rx_bytes=int(info.rx_bytes), revision=state.revision
        )

    # ------------------------------------------------------------------ not in PCCL
    def send(
        self, tensor: torch.Tensor, *, to: str, tag: int = 0, timeout_s: float | None = None
    ) -> None:
        """Not offered by PCCL: raises ``BackendUnavailableError`` (use the tcp backend)."""
        raise BackendUnavailableError(_NO_P2P)

    def recv(
        self, out: torch.Tensor, *, from_: str, tag: int = 0, timeout_s: float | None = None
    ) -> torch.Tensor:
        """Not offered by PCCL: raises ``BackendUnavailableError`` (use the tcp backend)."""
        raise BackendUnavailableError(_NO_P2P)

    def send_async(
        self, tensor: torch.Tensor, *, to: str, tag: int = 0, timeout_s: float | None = None
    ) -> Handle:
        """Not offered by PCCL: raises ``BackendUnavailableError`` (use the tcp backend)."""
        raise BackendUnavailableError(_NO_P2P)

    def recv_async(
        self, out: torch.Tensor, *, from_: str, tag: int = 0, timeout_s: float | None = None
    ) -> Handle:
        """Not offered by PCCL: raises ``BackendUnavailableError`` (use the tcp backend)."""
        raise BackendUnavailableError(_NO_P2P)
