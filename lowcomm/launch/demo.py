"""``lowcomm demo``: the main job on an embedded default.

Until the outer loops land this is the foundation's stand-in: a few local peers on loopback
all-reduce a tensor and check the sum against the exact answer.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NAME = "demo"
HELP = "run the main job on this machine: several local peers on loopback"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=3, help="number of local peers (default 3)")
    parser.add_argument("--numel", type=int, default=1_000_000, help="elements all-reduced")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peer(rank: int, world_size: int, port: int, numel: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x = torch.full((numel,), float(rank + 1))
        start = time.perf_counter()
        dist.all_reduce(x)
        elapsed = time.perf_counter() - start
        expected = world_size * (world_size + 1) / 2
        if not torch.all(x == expected):
            raise SystemExit(f"peer {rank}: wrong sum {x[0].item()} != {expected}")
        if rank == 0:
            print(f"{world_size} peers all-reduced {numel} floats in {elapsed * 1e3:.1f} ms: ok")
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    if args.peers < 1:
        raise SystemExit("--peers must be >= 1")
    mp.spawn(_peer, args=(args.peers, _free_port(), args.numel), nprocs=args.peers)
    return 0
