"""DiLoCo across replicas, FSDP2 inside each replica: one torchrun per replica.

Each replica is an ordinary FSDP2 job (its ranks close together, NCCL on GPUs or Gloo on CPU).
Between replicas, lowcomm all-reduces pseudo-gradients over the WAN. Every rank of every replica is
one lowcomm peer, and its *local shard index* is its peer group: shard i of every replica reduces
with shard i of the others (and only those), so the FSDP collectives inside a replica never wait on
the WAN. Run a master once, then one torchrun per replica (same --nproc-per-node everywhere):

    .venv/bin/lowcomm master --listen 0.0.0.0:48000 --token-file token
    LOWCOMM_MASTER=10.0.0.1:48000 LOWCOMM_TOKEN=secret LOWCOMM_REPLICA=0 LOWCOMM_NUM_REPLICAS=2 \\
        torchrun --nproc-per-node=2 examples/diloco_fsdp.py --steps 200
    LOWCOMM_MASTER=... LOWCOMM_REPLICA=1 ... torchrun --nproc-per-node=2 examples/diloco_fsdp.py

Each rank prints one line at the end: ``replica R shard S outer-hash H``; the hashes of one shard
index agree across replicas.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from lowcomm.comm import CommConfig, Communicator
from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.launch.peer import wait_for_world
from lowcomm.launch.tinygpt import GPT, GPTConfig, load_corpus, sample_batch


def main() -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", default=env("LOWCOMM_MASTER", "127.0.0.1:48000"))
    parser.add_argument("--token", default=env("LOWCOMM_TOKEN", ""))
    parser.add_argument("--replica", type=int, default=int(env("LOWCOMM_REPLICA", "0")))
    parser.add_argument("--num-replicas", type=int, default=int(env("LOWCOMM_NUM_REPLICAS", "1")))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, nproc = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(env("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # The same initial weights in every replica (the first shared-state sync would align them
    # anyway); FSDP2 shards them over this replica's ranks.
    torch.manual_seed(0)
    gpt = GPTConfig(num_layers=2, width=args.width, num_heads=2, context=32)
    model = GPT(gpt).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    inner = torch.optim.AdamW(model.parameters(), lr=2e-3)

    # One lowcomm peer per rank; peer group = local shard index.
    comm = Communicator(
        args.master, peer_group=rank, token=args.token or None, config=CommConfig(timeout_s=60.0)
    )
    comm.connect(timeout_s=120)
    # No forward pass before every rank of every replica is in (FSDP all-gathers would otherwise
    # block against a peer still waiting to be admitted: PCCL's FSDP footgun).
    wait_for_world(comm, args.num_replicas * nproc, timeout_s=120)
    trainer = DiLoCo(
        model, inner, comm, config=OuterConfig(method="diloco", sync_every=args.sync_every)
    )

    data = load_corpus(max_bytes=500_000)
    gen = torch.Generator().manual_seed(1000 * args.replica + rank)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = sample_batch(data, batch_size=8, context=gpt.context, generator=gen)
        loss = model(x.to(device), y.to(device))
        loss.backward()
        trainer.step()
        if rank == 0 and (step + 1) % args.sync_every == 0:
            print(f"replica {args.replica} step {step + 1} loss {loss.item():.3f}", flush=True)
    trainer.finish()
    print(
        f"replica {args.replica} shard {rank} outer-hash {trainer.outer_hash()[:16]} "
        f"outer-steps {trainer.stats.outer_steps} sent {trainer.stats.tx_bytes} B "
        f"in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    comm.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
