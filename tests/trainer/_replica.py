"""One replica of the resume test: a Trainer over the real communicator, checkpointing locally.

argv: MASTER INDEX ROOT OUT [--kill-at N] [--joining]. Writes JSON lines to OUT: ``start`` (what
it restored), ``first`` (after its first inner step), ``done`` (its outer hash and counters).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lowcomm.checkpoint import CheckpointConfig
from lowcomm.comm import CommConfig, Communicator
from lowcomm.diloco import OuterConfig
from lowcomm.faults import FaultInjector
from lowcomm.trainer import Trainer
from tests.trainer._data import Batches, make_model, train_step

TOKEN = b"trainer-resume-test-token-0123456789"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("master")
    ap.add_argument("index", type=int)
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--joining", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    faults = FaultInjector()
    if args.kill_at is not None:
        faults.inject("trainer.inner_step", kill=True, where={"step": args.kill_at})

    def emit(kind: str, **payload: object) -> None:
        with open(args.out, "a") as out:
            out.write(json.dumps({"kind": kind, **payload}) + "\n")

    torch.manual_seed(args.index)
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = Batches(seed=10 + args.index)
    comm = Communicator(
        args.master, token=TOKEN, config=CommConfig(timeout_s=30.0, poll_s=0.1, num_connections=1)
    )
    comm.connect(timeout_s=60)
    while not args.joining and comm.world_size < 2:
        comm.update_topology(timeout_s=60)
    trainer = Trainer(
        model,
        opt,
        comm,
        outer=OuterConfig(method="diloco", sync_every=4, quantization="none", timeout_s=30.0),
        checkpoint=CheckpointConfig(levels=(f"{args.root}/replica{args.index}",)),
        checkpoint_every=3,
        stateful={"data": data},
        faults=faults,
        joining=args.joining,
    )
    assert trainer.checkpointer is not None
    report = trainer.checkpointer.last_restore
    emit(
        "start",
        resumed_from=trainer.resumed_from,
        inner_step=trainer.inner_step,
        position=data.position,
        outer_step=trainer.outer_step,
        saved_outer_step=None if report is None else report.metadata["outer_step"],
        took_run_state=trainer.took_run_state,
    )
    join_step = trainer.outer_step if args.joining else None
    joins = trainer.stats.joins
    first = True
    while join_step is None or trainer.outer_step < join_step + 3:
        if join_step is None:
            assert trainer.outer_step < 400, "the restarted replica never came back"
            time.sleep(0.02)  # wait for the other replica's restart without racing ahead
        train_step(model, data, trainer)
        if first:
            emit("first", inner_step=trainer.inner_step, position=data.position)
            first = False
        if trainer.stats.joins > joins and join_step is None:
            join_step = trainer.outer_step
    trainer.finish()
    emit(
        "done",
        hash=trainer.diloco.outer_hash(),
        outer_step=trainer.outer_step,
        inner_step=trainer.inner_step,
        join_step=join_step,
        world_size=comm.world_size,
    )
    comm.close()


if __name__ == "__main__":
    main()
