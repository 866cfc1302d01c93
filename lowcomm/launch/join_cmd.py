"""``lowcomm join ADDRESS``: a volunteer node joins a run, trains, and leaves cleanly on Ctrl-C.

It authenticates with the run token, downloads the run's configuration from the master (the bytes
given to ``lowcomm master --config-file``: a JSON object, see ``RUN_CONFIG_KEYS``; an empty one
means the demo's model and outer loop), receives the current outer state from the running peers
(or starts the run if it is the first), and trains the tiny GPT on the embedded corpus.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

NAME = "join"
HELP = "join a run as a volunteer peer: authenticate, download config and state, train"

RUN_CONFIG_KEYS = ("outer", "gpt", "batch_size", "lr", "outer_steps")

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="the master's HOST:PORT")
    parser.add_argument("--token-file", default=None, help="file holding the run token")
    parser.add_argument("--index", type=int, default=None, help="data shard seed (default random)")
    parser.add_argument("--outer-steps", type=int, default=None, help="stop after this many")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per blocking call")


def parse_run_config(blob: bytes) -> dict[str, Any]:
    """The run's configuration from the master's blob; ValueError naming what is wrong."""
    from lowcomm.diloco import OuterConfig
    from lowcomm.launch.tinygpt import GPTConfig

    raw: dict[str, Any] = {}
    if blob.strip():
        try:
            raw = json.loads(blob)
        except ValueError as exc:
            raise ValueError(f"the run configuration is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("the run configuration must be a JSON object")
        unknown = set(raw) - set(RUN_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"unknown run configuration keys {sorted(unknown)}; known: {RUN_CONFIG_KEYS}"
            )
    return {
        "outer": OuterConfig(**{"method": "async", "sync_every": 20, **raw.get("outer", {})}),
        "gpt": GPTConfig(**raw.get("gpt", {})),
        "batch_size": int(raw.get("batch_size", 16)),
        "lr": float(raw.get("lr", 2e-3)),
        "outer_steps": int(raw.get("outer_steps", 1_000_000)),
    }


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from lowcomm.comm import CommConfig, Communicator
    from lowcomm.diloco import DiLoCo
    from lowcomm.launch.experiments import Corpus
    from lowcomm.launch.tinygpt import GPT, sample_batch

    token = Path(args.token_file).read_bytes().strip() if args.token_file else None
    comm = Communicator(args.address, token=token, config=CommConfig(timeout_s=args.timeout))
    comm.connect(timeout_s=args.timeout * 5)
    try:
        try:
            cfg = parse_run_config(comm.config_blob)
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"cannot use the run's configuration: {exc}") from None
        joining = comm.world_size > 1
        index = args.index if args.index is not None else int.from_bytes(os.urandom(2), "big")
        torch.manual_seed(0)
        model = GPT(cfg["gpt"])
        inner = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
        trainer = DiLoCo(model, inner, comm, config=cfg["outer"], joining=joining)
        print(
            f"{'joined' if joining else 'started'} the run: world of {comm.world_size}, "
            f"outer step {trainer.stats.outer_steps}",
            flush=True,
        )
        corpus = Corpus.load()
        gen = torch.Generator().manual_seed(index)
        target = args.outer_steps if args.outer_steps is not None else cfg["outer_steps"]
        last = time.perf_counter()
        while trainer.stats.outer_steps < target:
            x, y = sample_batch(
                corpus.train,
                batch_size=cfg["batch_size"],
                context=cfg["gpt"].context,
                generator=gen,
            )
            loss = model(x, y)
            loss.backward()
            before = trainer.stats.outer_steps
            trainer.step()
            if trainer.stats.outer_steps != before and time.perf_counter() - last > 2.0:
                last = time.perf_counter()
                print(
                    f"outer step {trainer.stats.outer_steps}: loss {loss.item():.3f}, world "
                    f"{comm.world_size}, sent {trainer.stats.tx_bytes / 1e6:.2f} MB",
                    flush=True,
                )
        trainer.finish()
        print(
            f"done at outer step {trainer.stats.outer_steps}: outer-hash {trainer.outer_hash()[:16]}"
        )
        return 0
    except KeyboardInterrupt:
        print("leaving the run (Ctrl-C)", flush=True)
        return 130
    finally:
        comm.close()  # tells the master at once: the others do not wait for a heartbeat timeout
