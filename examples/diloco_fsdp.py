"""DiLoCo across replicas, FSDP2 inside each replica: one torchrun per replica.

Each replica is an ordinary FSDP2 job (its ranks close together, NCCL on GPUs or Gloo on CPU).
Between replicas, lowcomm all-reduces pseudo-gradients over the WAN. Every rank of every replica is
one lowcomm peer, and its *local shard index* is its peer group: shard i of every replica reduces
with shard i of the others (and only those), so the FSDP collectives inside a replica never wait on
the WAN. ``lowcomm.init()`` admits a replica's ranks together (all of them or none) and waits for
``LOWCOMM_MIN_REPLICAS`` whole replicas. Run a master once, then one torchrun per replica (same
--nproc-per-node everywhere):

    .venv/bin/lowcomm master --listen 0.0.0.0:48000 --token-file token
    LOWCOMM_MASTER=10.0.0.1:48000 LOWCOMM_TOKEN_FILE=token LOWCOMM_REPLICA_ID=r0 \\
        LOWCOMM_MIN_REPLICAS=2 torchrun --nproc-per-node=2 examples/diloco_fsdp.py --steps 200
    LOWCOMM_MASTER=... LOWCOMM_REPLICA_ID=r1 ... torchrun --nproc-per-node=2 examples/diloco_fsdp.py

Each rank prints one line at the end: ``replica R shard S outer-hash H``; the hashes of one shard
index agree across replicas.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.distributed.fsdp import fully_shard

import lowcomm
from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.launch.tinygpt import GPT, GPTConfig, load_corpus, sample_batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()

    # Before any forward pass: FSDP's collectives must not start until this replica is in (all
    # of its ranks at once), or they would block against a rank still waiting for admission.
    run = lowcomm.init()  # torchrun + LOWCOMM_* variables; peer group = shard index
    device, rank = run.device, run.shard_index

    # The same initial weights in every replica (the first shared-state sync would align them
    # anyway); FSDP2 shards them over this replica's ranks.
    torch.manual_seed(0)
    gpt = GPTConfig(num_layers=2, width=args.width, num_heads=2, context=32)
    model = GPT(gpt).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    inner = torch.optim.AdamW(model.parameters(), lr=2e-3)

    trainer = DiLoCo(
        model, inner, run.comm, config=OuterConfig(method="diloco", sync_every=args.sync_every)
    )

    data = load_corpus(max_bytes=500_000)
    gen = torch.Generator().manual_seed(sum(map(ord, run.replica_id)) * 1000 + rank)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = sample_batch(data, batch_size=8, context=gpt.context, generator=gen)
        loss = model(x.to(device), y.to(device))
        loss.backward()
        trainer.step()
        if rank == 0 and (step + 1) % args.sync_every == 0:
            print(f"replica {run.replica_id} step {step + 1} loss {loss.item():.3f}", flush=True)
    trainer.finish()
    print(
        f"replica {run.replica_id} shard {rank} outer-hash {trainer.outer_hash()[:16]} "
        f"outer-steps {trainer.stats.outer_steps} sent {trainer.stats.tx_bytes} B "
        f"in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    run.close()  # leaves the run and ends the process group init() created
    return 0


if __name__ == "__main__":
    sys.exit(main())
