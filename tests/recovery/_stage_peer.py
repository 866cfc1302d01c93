"""One pipeline stage as a process, for the fault tests: ``run_stage(spec, events)``.

The spec (a dict) names the master, the stage, the pipeline config, the store's directory, the
steps, an optional fault on this stage and a dump directory: after every committed step, every
step applied tentatively and every rebuild the stage saves its parameters and gradient norm there,
so the test can compute the rule's plain-torch reference from exactly what the sources held.
Events go to ``events`` as ``(kind, stage, info)``.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowcomm.comm import CommConfig, Communicator, PeerFailureError
from lowcomm.faults import FaultInjector
from lowcomm.recovery.pipeline import PipelineConfig, StagePeer
from lowcomm.recovery.rules import clone_state
from lowcomm.recovery.simulator import Method, SimConfig, SimPipeline
from lowcomm.recovery.store import StageStore

TOKEN = b"lowcomm-test-token-0123456789abcdef"

# The first Adam of a process imports torch's compiler stack (seconds, and tens of seconds with
# several stages starting at once on a loaded machine): do it here, once, in the forkserver that
# preloads this module, so every stage process forks with it loaded.
torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def batches(config: PipelineConfig, replica: Any = None):  # type: ignore[no-untyped-def]
    """The whole step's batch, from a generator seeded by the step (the same in the sim test);
    with pipeline replicas, by the replica too (``replica()``: each replica sees its own data)."""
    size = config.micro_batch_size * config.num_micro_batches
    context = config.stages.context

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        extra = 0 if replica is None or config.num_replicas == 1 else 100_000 * replica()
        gen = torch.Generator().manual_seed(1000 + step + extra)
        window = torch.randint(0, 256, (size, context + 1), generator=gen)
        return window[:, :-1], window[:, 1:]

    return batch


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit equality of two state dicts of tensors (same keys)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def simulator_of(config: PipelineConfig, num_steps: int, method: Method) -> SimPipeline:
    """The single-process simulator of ``config``'s pipeline (fed with ``batches(config)``)."""
    sim_config = SimConfig(
        stages=config.stages,
        num_steps=num_steps,
        batch_size=config.micro_batch_size * config.num_micro_batches,
        num_micro_batches=config.num_micro_batches,
        lr=config.lr,
        max_grad_norm=config.max_grad_norm,
    )
    return SimPipeline(sim_config, method)


def dump_path(root: str, stage: int | str, what: str) -> Path:
    return Path(root) / f"stage{stage}_{what}.pt"


def arm_fault(
    spec: dict[str, Any], events: Any, settle: Callable[[], None] | None = None
) -> FaultInjector | None:
    """The injector for ``spec["fault"]`` (None without one). Its rule first marks the moment
    (``fault<stage>.txt`` in the dump directory, fsync'ed) and, before a kill or a stop, flushes
    ``events``: a multiprocessing queue's ``put`` returns before its feeder thread has written the
    item, and a process that dies with the feeder mid-write loses the item *and* leaves the
    queue's shared write lock held, so no other process's event ever arrives again. Before that it
    calls ``settle()`` (the stage's ``votes.settle``): a stage attempts step t + 1 while its vote on
    step t is in flight, and the test's scenario (step t committed, the fault in step t + 1) must not
    depend on whether that vote closed before the fault was noticed."""
    fault = spec.get("fault")
    if not fault:
        return None
    stage = spec["stage"]
    faults = FaultInjector()

    def mark(context: Any) -> None:  # the moment of the fault, before the process dies
        if settle is not None:
            settle()
        with open(Path(spec["dump"]) / f"fault{stage}.txt", "w") as f:
            f.write(repr(time.time()))
            f.flush()
            os.fsync(f.fileno())
        if fault["action"] in ("kill", "stop"):
            events.close()
            events.join_thread()  # every event put so far is in the pipe, the lock released

    point = fault.get("point", "pipeline.micro_batch")
    where = (
        {"step": fault["step"], "mb": fault["mb"], "phase": fault["phase"]}
        if point == "pipeline.micro_batch"
        else {"step": fault["step"]}
    )
    faults.inject(
        point,
        kill=fault["action"] == "kill",
        stop=fault["action"] == "stop",
        error=PeerFailureError("injected") if fault["action"] == "error" else None,
        call=mark,
        where=where,
    )
    return faults


def run_stage(spec: dict[str, Any], events: Any) -> None:
    torch.set_num_threads(1)
    if os.environ.get("LOWCOMM_TEST_DEBUG"):
        logging.basicConfig(
            level=logging.DEBUG, format=f"%(relativeCreated)d s{spec['stage']} %(name)s %(message)s"
        )
    stage = spec["stage"]
    config: PipelineConfig = spec["config"]
    faults = arm_fault(spec, events, settle=lambda: peer.votes.settle())
    comm = Communicator(
        spec["master"],
        peer_group=stage,
        token=TOKEN,
        config=CommConfig(timeout_s=config.timeout_s, poll_s=0.1),
    )
    peer: StagePeer  # assigned below; the closures read it when they run
    label = "replacement" if spec.get("replacement") else "original"

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind in ("committed", "recovered", "applied"):
            # "applied": the step applied tentatively while its vote is in flight, what a stage
            # killed in the attempt run ahead of that vote held when it died.
            names = {"committed": "step", "applied": "applied"}
            what = f"{label}_{names[kind]}{info['step']}" if kind in names else f"{label}_rebuilt"
            norm = peer.grad_norm
            # With pipeline replicas a dump is named by its slot: "<stage>r<replica>".
            key = stage if config.num_replicas == 1 else f"{stage}r{peer.replica}"
            torch.save(
                {
                    "params": {k: v.clone() for k, v in peer.module.state_dict().items()},
                    "grad_norm": None if norm is None else (norm.before_clip, norm.after_clip),
                    "backup": peer.backup,
                    "optimizer": clone_state(peer.optimizer.state_dict()),
                    "outer": None if peer.outer is None else peer.outer.state(),
                },
                dump_path(spec["dump"], key, what),
            )
        events.put((kind, stage, info))

    peer = StagePeer(
        comm,
        config,
        store=StageStore(spec["store"]),
        batches=batches(config, lambda: peer.replica) if stage == 0 else None,
        replacement=bool(spec.get("replacement")),
        faults=faults,
        on_event=on_event,
    )
    try:
        peer.run(spec["num_steps"])
    except BaseException:
        events.put(("error", stage, traceback.format_exc()))
        raise
    finally:
        comm.close()
