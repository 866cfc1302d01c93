"""N-to-M restore: a checkpoint of N FSDP2 ranks restored on M ranks (N, M in {1, 2}) equals the
saved tensors, into FSDP2 shards and into a plain unsharded model; and a Trainer over FSDP2
restores into a fresh model and optimizer in place, with nothing primed by the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from lowcomm.checkpoint.reader import CheckpointReader

HERE = Path(__file__).resolve().parent


def _launch(world: int, *args: str) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["WORLD_SIZE"] = str(world)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_reshard_worker.py"), *args],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r), PYTHONPATH=str(HERE.parent.parent)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(HERE.parent.parent),
        )
        for r in range(world)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=100)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"OK {r}" in out, out[-3000:]


@pytest.mark.timeout(240)
def test_a_checkpoint_of_n_fsdp_ranks_restores_on_m_ranks_equal_to_the_saved_tensors(
    tmp_path: Path,
) -> None:
    one, two = tmp_path / "saved_by_1", tmp_path / "saved_by_2"
    one.mkdir()
    two.mkdir()
    # Each restore reads both checkpoints, into FSDP2 over its ranks and into an unsharded model.
    _launch(1, f"save:{one}")
    _launch(2, f"save:{two}", f"restore:{one},{two}", f"trainer:{two}")
    _launch(1, f"restore:{one},{two}")
    # What `lowcomm checkpoint export` writes: the 2 ranks' shards assembled whole, off any job.
    with CheckpointReader(str(two / "ckpt")) as reader:
        whole = reader.load_full(2)
    ref = torch.load(two / "ref.pt")
    for k, v in whole["model"].items():
        assert torch.equal(v, ref[f"model/{k}"]), k
    for idx, s in whole["optim"]["state"].items():
        for name, v in s.items():
            assert torch.equal(v, ref[f"optim/{idx}/{name}"]), (idx, name)
