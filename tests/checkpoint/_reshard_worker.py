"""One rank of the N-to-M restore test (FSDP2 on CPU with gloo; RANK, WORLD_SIZE, MASTER_* set).

argv: one or more of ``save:DIR`` (trains 2 steps, checkpoints step 2 to DIR/ckpt and writes the
full tensors to DIR/ref.pt from rank 0) and ``restore:DIR,DIR...`` (restores each DIR's checkpoint into a freshly built model
(FSDP2 over this world, and a plain unsharded one) and a fresh AdamW, and compares the full tensors
with DIR/ref.pt), run in order. Prints ``OK <rank>`` when every check passed.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lowcomm.checkpoint import CheckpointConfig, Checkpointer
from lowcomm.diloco import OuterConfig
from lowcomm.testing import SoloCommunicator
from lowcomm.trainer import Trainer
from lowcomm.trainer.trainer import prime_optimizer


def build(seed: int, *, shard: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # 33 and 7 rows: uneven shards on 2 ranks (17 + 16, 4 + 3), so offsets really matter.
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7))
    if shard:
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def full(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state["model"].items():
        out[f"model/{k}"] = v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
    for idx, s in state["optim"]["state"].items():
        for name, v in s.items():
            out[f"optim/{idx}/{name}"] = v.full_tensor() if isinstance(v, DTensor) else v.clone()
    return out


def main() -> None:
    dist.init_process_group("gloo")
    for arg in sys.argv[1:]:
        mode, _, dirs = arg.partition(":")
        run(mode, dirs.split(","))
        dist.barrier()
    print(f"OK {dist.get_rank()}", flush=True)
    dist.destroy_process_group()


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def trainer_round_trip(root: str) -> None:
    """A Trainer over FSDP2 restores model, moments and outer state into fresh objects in place."""
    outer = OuterConfig(sync_every=2, quantization="none")
    ckpt = CheckpointConfig(levels=(f"{root}/trainer",))
    model, opt = build(0, shard=True)
    trainer = Trainer(
        model, opt, SoloCommunicator(), outer=outer, checkpoint=ckpt, checkpoint_every=3
    )
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        model(torch.randn(8, 16, generator=g)).square().mean().backward()
        trainer.step()
    trainer.finish()  # the model now holds theta; the checkpoint has the inner parameters
    with Checkpointer(ckpt) as reader:
        saved = reader.restore()  # plain local shards, as saved
    moments = {i: local(s["exp_avg"]) for i, s in opt.state_dict()["state"].items()}
    theta = trainer.diloco.outer_params.clone()

    model2, opt2 = build(1, shard=True)  # another init, a fresh optimizer with no state
    again = Trainer(model2, opt2, SoloCommunicator(), outer=outer, checkpoint=ckpt)
    assert again.resumed_from == 3 and again.outer_step == 1
    assert torch.equal(again.diloco.outer_params, theta)
    for k, v in model2.state_dict().items():
        assert isinstance(v, DTensor)
        assert torch.equal(local(v), local(saved["diloco"]["model"][k])), k
    for i, s in opt2.state_dict()["state"].items():
        assert isinstance(s["exp_avg"], DTensor)
        assert torch.equal(local(s["exp_avg"]), moments[i]), i
    again.finish()


def run(mode: str, dirs: list[str]) -> None:
    rank = dist.get_rank()
    if mode == "trainer":
        trainer_round_trip(dirs[0])
        return
    if mode == "save":
        model, opt = build(0, shard=True)
        for i in range(2):
            g = torch.Generator().manual_seed(i)
            model(torch.randn(8, 16, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        ck = Checkpointer(CheckpointConfig(levels=(f"{dirs[0]}/ckpt",), chunk_bytes=4096))
        ck.save(2, state)
        ck.close()
        ref = full(state)
        if rank == 0:
            torch.save(ref, f"{dirs[0]}/ref.pt")
    else:
        for d in dirs:
            ref = torch.load(f"{d}/ref.pt")
            for shard in (True, False):
                model, opt = build(1, shard=shard)
                prime_optimizer(opt)
                ck = Checkpointer(CheckpointConfig(levels=(f"{d}/ckpt",), chunk_bytes=4096))
                template = {"model": model.state_dict(), "optim": opt.state_dict()}
                restored = ck.restore(into=template)
                model.load_state_dict(restored["model"])
                opt.load_state_dict(restored["optim"])
                got = full({"model": model.state_dict(), "optim": opt.state_dict()})
                assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
                for k in ref:
                    assert torch.equal(got[k], ref[k]), (d, shard, k)
                ck.close()


if __name__ == "__main__":
    main()
