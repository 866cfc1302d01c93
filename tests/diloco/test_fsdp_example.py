"""examples/diloco_fsdp.py under torchrun: 2 replica groups x 2 FSDP2 ranks, Gloo on CPU."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lowcomm.comm import Master
from tests._tokens import TOKEN

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_replicas(num_procs: int, extra_env: dict[str, str]) -> list[str]:
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=10.0).start()
    try:
        procs = []
        for replica in range(2):
            env = dict(
                os.environ,
                LOWCOMM_MASTER="{}:{}".format(*master.address),
                LOWCOMM_TOKEN=TOKEN.decode(),
                LOWCOMM_REPLICA_ID=str(replica),
                LOWCOMM_MIN_REPLICAS="2",
                LOWCOMM_LISTEN_HOST="127.0.0.1",
                OMP_NUM_THREADS="1",
                **extra_env,
            )
            cmd = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={num_procs}",
                "--master-port", str(_free_port()), str(ROOT / "examples" / "diloco_fsdp.py"),
                "--steps", "20", "--sync-every", "5",
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        outputs = []
        for p in procs:
            out, _ = p.communicate(timeout=240)
            assert p.returncode == 0, out[-4000:]
            outputs.append(out)
        return outputs
    finally:
        master.stop()


@pytest.mark.timeout(300)
def test_two_replicas_of_two_fsdp_ranks_agree_shard_by_shard() -> None:
    outputs = _run_replicas(2, {"CUDA_VISIBLE_DEVICES": ""})
    hashes: dict[tuple[int, int], str] = {}
    for out in outputs:
        for replica, shard, digest, steps in re.findall(
            r"replica (\d) shard (\d) outer-hash (\w+) outer-steps (\d+)", out
        ):
            assert int(steps) == 4
            hashes[(int(replica), int(shard))] = digest
    assert len(hashes) == 4, outputs
    assert hashes[(0, 0)] == hashes[(1, 0)]
    assert hashes[(0, 1)] == hashes[(1, 1)]
    assert hashes[(0, 0)] != hashes[(0, 1)]  # each shard group holds its own part of the model


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_fsdp_example_runs_on_cuda() -> None:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        pytest.skip("needs CUDA")
    outputs = _run_replicas(1, {})
    digests = [re.findall(r"outer-hash (\w+)", out) for out in outputs]
    assert digests[0] and digests[0] == digests[1]
