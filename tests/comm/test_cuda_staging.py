"""CUDA tensors go through pinned host memory: all-reduce and shared-state sync on GPU tensors."""

from __future__ import annotations

import pytest
import torch
from _control_harness import addr, connect_all, run_threads, start_master

from lowcomm.comm import SharedState

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device machine)"),
]


@pytest.mark.timeout(120)
def test_cuda_tensors_all_reduce_and_sync_through_pinned_memory() -> None:
    master = start_master()
    try:
        comms = connect_all(addr(master), 2)
        xs = [
            torch.full((1001,), float(i + 1), device="cuda", dtype=torch.bfloat16) for i in range(2)
        ]
        view = [x[::2] for x in xs]  # non-contiguous views are staged too
        run_threads(
            [
                lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=60)
                for c, x in zip(comms, view, strict=True)
            ]
        )
        for x in xs:
            assert x.device.type == "cuda"
            assert torch.all(x[::2] == 3.0) and torch.all(x[1::2] != 3.0)
        states = [
            SharedState(
                {
                    "w": torch.randn(
                        10_000, device="cuda", generator=torch.Generator("cuda").manual_seed(s)
                    )
                },
                revision=r,
            )
            for s, r in ((0, 2), (1, 0))
        ]
        before = states[1].state_hash()
        run_threads(
            [
                lambda c=c, s=s: c.sync_shared_state(s, timeout_s=60)
                for c, s in zip(comms, states, strict=True)
            ]
        )
        assert before != states[0].state_hash()
        assert states[1].state_hash() == states[0].state_hash()
        assert states[1].tensors["w"].device.type == "cuda"
        for c in comms:
            c.close()
    finally:
        master.stop()
