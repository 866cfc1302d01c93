"""The same communicator API over the real PCCL (``open_communicator(backend="pccl")``), where its
wheel loads.

PCCL's wheel (PyPI ``pypccl``) needs CPython 3.12 and glibc >= 2.38: the multi-process test runs
on the device machine (the wheel travels with the call) and is skipped elsewhere with the reason.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
from _control_harness import Peer

from lowcomm.comm import (
    CommBackend,
    CommConfig,
    Communicator,
    PcclCommunicator,
    SharedState,
    open_communicator,
)
from lowcomm.comm.pccl import BackendUnavailableError, PcclMaster, pccl_unavailable_reason
from lowcomm.comm.shared_state import tensor_hash

REASON = pccl_unavailable_reason()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        open_communicator("127.0.0.1:1", backend="nccl")


@pytest.mark.skipif(REASON is None, reason="pccl loads here")
def test_pccl_backend_says_why_it_cannot_load_here() -> None:
    with pytest.raises(BackendUnavailableError, match="pypccl"):
        open_communicator("127.0.0.1:1", backend="pccl")


def test_the_pccl_communicator_offers_every_method_of_the_comm_backend_protocol() -> None:
    members = [n for n in vars(CommBackend) if not n.startswith("_")]
    assert {"connect", "all_reduce", "sync_shared_state", "send", "world_size"} <= set(members)
    missing = [n for n in members if not hasattr(PcclCommunicator, n)]
    assert not missing, missing
    assert not issubclass(PcclCommunicator, Communicator)  # no subclassing of the TCP backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pccl_peer(address: str, index: int, n: int) -> dict[str, Any]:
    config = CommConfig(timeout_s=60.0)
    c = open_communicator(address, backend="pccl", config=config)
    c.connect(timeout_s=60)
    while c.world_size < n:
        c.update_topology(timeout_s=60)
    out: dict[str, Any] = {"world": c.world_size, "group_world": c.peer_group_world_size}
    # Exact sums: integer-valued floats add exactly in any order.
    gen = torch.Generator().manual_seed(index)
    x = torch.randint(-100, 100, (1001,), generator=gen).float()
    mine = x.clone()
    info = c.all_reduce(x, "sum", timeout_s=60)
    out["sum_hash"] = tensor_hash(x)
    out["mine"] = mine.tolist()
    out["sum"] = x.tolist()
    out["info_world"] = info.world_size
    y = torch.full((10,), float(index + 1))
    c.all_reduce(y, "max", timeout_s=60)
    out["max"] = float(y[0])
    # Several in flight, told apart by tag.
    zs = [torch.full((100,), float(index + k)) for k in range(3)]
    handles = [c.all_reduce_async(z, "sum", tag=k, timeout_s=60) for k, z in enumerate(zs)]
    for h in handles:
        h.wait()
    out["async"] = [float(z[0]) for z in zs]
    # Shared state: peers 0 and 1 agree, peer 2 is stale; enforce_popular must fix it.
    seed = 7 if index < 2 else 8
    g2 = torch.Generator().manual_seed(seed)
    state = SharedState(
        {"w": torch.randn(50_000, generator=g2), "b": torch.randn(3, generator=g2)}, revision=1
    )
    out["before"] = state.state_hash()
    sync = c.sync_shared_state(state, timeout_s=60)
    out["after"] = state.state_hash()
    out["rx"] = sync.rx_bytes
    c.close()
    return out


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.timeout(240)
def test_all_reduce_and_shared_state_sync_run_on_the_pccl_backend() -> None:
    port = _free_port()
    master = PcclMaster(("127.0.0.1", port)).start()
    peers: list[Peer] = []
    try:
        n = 3
        peers = [Peer(_pccl_peer, f"127.0.0.1:{port}", i, n) for i in range(n)]
        results = [p.result(timeout_s=200) for p in peers]
    finally:
        for p in peers:
            p.kill()
        master.stop()
    exact = torch.stack([torch.tensor(r["mine"]) for r in results]).sum(0)
    for r in results:
        assert r["world"] == n and r["info_world"] == n
        assert torch.equal(torch.tensor(r["sum"]), exact)
        assert r["sum_hash"] == results[0]["sum_hash"]
        assert r["max"] == float(n)
        assert r["async"] == [float(sum(i + k for i in range(n))) for k in range(3)]
    assert results[2]["before"] != results[0]["before"]  # the stale peer really differed
    assert {r["after"] for r in results} == {results[0]["before"]}  # all bit-identical now
    assert results[2]["rx"] > 0
