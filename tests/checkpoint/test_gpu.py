"""The CUDA path: side-stream copies into pinned, reused host buffers (run on the device machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_same

from lowcomm.checkpoint import CheckpointConfig, Checkpointer
from lowcomm.faults import FaultInjector

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _cuda_state(seed: int) -> dict[str, object]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "w": torch.randn(1024, 1024, device="cuda", generator=g),
        "half": torch.randn(4096, device="cuda", generator=g).to(torch.bfloat16),
        "t": torch.randn(64, 32, device="cuda", generator=g).t(),  # non-contiguous
        "step": torch.tensor(3.0),  # CPU, as AdamW keeps it
        "pos": seed,
    }


def test_cuda_state_round_trips_bit_exact_through_pinned_reused_buffers(tmp_path: Path) -> None:
    with Checkpointer(CheckpointConfig(levels=("host://", str(tmp_path)))) as ck:
        for step in range(4):
            state = _cuda_state(step)
            ck.save(step, state).wait("local", timeout_s=60)
            ck.wait_until_safe_to_mutate()
            cpu_ref = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            assert_same(cpu_ref, ck.restore(levels=["host"]))
            assert_same(cpu_ref, ck.restore(levels=["local"]))
            into = _cuda_state(100)
            ck.restore(levels=["local"], into=into)
            assert into["w"].is_cuda and torch.equal(into["w"], state["w"])
        assert ck._pool.num_allocations == 2  # two pinned buffers, allocated once, then reused
        assert all(b.data is not None and b.data.is_pinned() for b in ck._pool._buffers)


@pytest.mark.parametrize("barrier", [False, True])
def test_cuda_barrier_protects_the_side_stream_copy(tmp_path: Path, barrier: bool) -> None:
    faults = FaultInjector()
    faults.inject("copy", delay_s=0.5, times=1)
    w = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    original = w.clone()
    with Checkpointer(CheckpointConfig(levels=("host://",)), faults=faults) as ck:
        handle = ck.save(1, {"w": w})
        if barrier:
            ck.wait_until_safe_to_mutate()
        w.add_(1.0)  # optimizer.step() on the training stream
        handle.wait("host", timeout_s=30)
        got = ck.restore()["w"].cuda()
    assert faults.fired("copy") == 1
    assert torch.equal(got, original if barrier else original + 1.0)
