"""Sharded (FSDP2 / DTensor) state saved per shard by 2 gloo ranks under one global manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(150)
def test_two_rank_fsdp2_state_round_trips_per_shard_at_every_level_and_ranks_agree_on_fallback(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_sharded_worker.py"), str(tmp_path)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(HERE.parent.parent),
        )
        for r in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"OK {r}" in out, out[-3000:]
