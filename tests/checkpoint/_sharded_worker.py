"""One rank of the 2-rank sharded checkpoint test: FSDP2 ``fully_shard`` on CPU with gloo.

Run by test_sharded.py with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; argv: ROOT.
Prints ``OK <rank>`` when every check passed (an AssertionError exits non-zero otherwise).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lowcomm.checkpoint import CheckpointConfig, Checkpointer


def local_shards(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state["model"].items():
        out[f"model/{k}"] = v.to_local().detach().clone()
    for idx, s in state["optim"]["state"].items():
        for name, v in s.items():
            t = v.to_local() if isinstance(v, DTensor) else v
            out[f"optim/{idx}/{name}"] = t.detach().clone()
    return out


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(8, 16, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def main() -> None:
    root = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(2):
        train_step(model, opt, i)

    levels = ("host://", f"{root}/local", f"file://{root}/remote")
    ck = Checkpointer(CheckpointConfig(levels=levels, chunk_bytes=4096))
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 2}
    assert all(isinstance(v, DTensor) for v in state["model"].values())
    saved = local_shards(state)
    handle = ck.save(2, state, metadata={"world": world})
    ck.wait_until_safe_to_mutate()
    train_step(model, opt, 2)  # changes every shard after the barrier
    handle.wait("remote", timeout_s=60)
    changed = local_shards({"model": model.state_dict(), "optim": opt.state_dict()})
    assert any(not torch.equal(saved[k], changed[k]) for k in saved)

    # A single global manifest, one data file per rank, at both levels.
    for lvl in ("local", "remote"):
        names = sorted(os.listdir(f"{root}/{lvl}/step_000000000002"))
        assert (
            "MANIFEST.json" in names and "rank_00000.data" in names and "rank_00001.data" in names
        ), names

    for lvl in ("host", "local", "remote"):
        template = {"model": model.state_dict(), "optim": opt.state_dict(), "step": -1}
        restored = ck.restore(into=template, levels=[lvl])
        assert ck.last_restore is not None and ck.last_restore.level == lvl
        model.load_state_dict(restored["model"])
        opt.load_state_dict(restored["optim"])
        got = local_shards({"model": model.state_dict(), "optim": opt.state_dict()})
        assert got.keys() == saved.keys()
        for k in saved:
            assert torch.equal(got[k], saved[k]), (lvl, k)
        assert restored["step"] == 2
        train_step(model, opt, 2)  # move away again before the next level

    # Rank 1's shard of step 3 is corrupted: both ranks must agree to fall back to step 2.
    ck.save(3, {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3}).wait("local")
    ck.wait_until_safe_to_mutate()
    dist.barrier()
    if rank == 1:
        path = f"{root}/local/step_000000000003/rank_00001.data"
        with open(path, "r+b") as f:
            first = f.read(8)
            f.seek(7)
            f.write(bytes([first[7] ^ 0xFF]))
    dist.barrier()
    restored = ck.restore(levels=["local"])
    assert ck.last_restore is not None and ck.last_restore.step == 2, ck.last_restore
    assert restored["step"] == 2
    if rank == 1:
        assert "checksum mismatch" in " ".join(ck.last_restore.skipped), ck.last_restore.skipped
    else:
        assert "another rank" in " ".join(ck.last_restore.skipped), ck.last_restore.skipped
    ck.close()
    dist.barrier()
    dist.destroy_process_group()
    print(f"OK {rank}", flush=True)


if __name__ == "__main__":
    main()
