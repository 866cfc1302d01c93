"""Failure-free throughput of the pipeline runtime against the same stages without recovery.

Both run the same ``StagePeer`` stages, messages and GPipe schedule in one process per stage on
loopback; the baseline (``_NoRecovery``) leaves out what recovery adds to a failure-free step: the
watcher's membership probes, the world-wide commit vote per step and the copy that lets a step be
applied tentatively while its vote is in flight (``lowcomm.recovery.commit``); it applies each step
at once and starts the next, as recovery's runtime does when its vote commits. Interleaved rep by
rep; steps per second of stage 0's commits after a warm-up. Used by ``benchmarks/recovery.py
--runtime``.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from typing import Any

import torch

from lowcomm.comm import CommConfig, Communicator, Master
from lowcomm.recovery.pipeline import PipelineConfig, StagePeer
from lowcomm.recovery.store import StageStore

TOKEN = b"lowcomm-bench-token-0123456789abcdef"
WARMUP = 5

# The first Adam of a process imports torch's compiler stack; the forkserver does it once.
torch.optim.Adam([torch.zeros(1, requires_grad=True)])


class _NoRecovery(StagePeer):
    """The same pipeline without recovery: no watcher, no vote; a failure would hang it."""

    def run(self, num_steps: int, *, connect_timeout_s: float = 60.0) -> None:
        self.comm.connect(timeout_s=connect_timeout_s)
        self._gather()
        self.revision = self.comm.revision
        while self.step < num_steps:
            norm = self._attempt(self.step)
            if norm is None:
                raise RuntimeError(f"stage {self.stage}: step {self.step} failed")
            self._commit(norm)
        self.on_event("done", {"stage": self.stage, "step": self.step})


def _batches(config: PipelineConfig):  # type: ignore[no-untyped-def]
    size = config.micro_batch_size * config.num_micro_batches

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(step)
        w = torch.randint(0, 256, (size, config.stages.context + 1), generator=gen)
        return w[:, :-1], w[:, 1:]

    return batch


def _stage(spec: dict[str, Any], out: Any) -> None:
    torch.set_num_threads(1)
    config: PipelineConfig = spec["config"]
    comm = Communicator(
        spec["master"],
        peer_group=spec["stage"],
        token=TOKEN,
        config=CommConfig(timeout_s=60.0, poll_s=0.1),
    )
    times: list[float] = []

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "committed":
            times.append(time.perf_counter())

    cls = StagePeer if spec["recovery"] else _NoRecovery
    peer = cls(
        comm,
        config,
        store=StageStore(spec["store"]),
        batches=_batches(config) if spec["stage"] == 0 else None,
        on_event=on_event,
    )
    try:
        peer.run(spec["num_steps"])
    finally:
        comm.close()
    out.put((spec["stage"], times))


def _one(config: PipelineConfig, *, recovery: bool, num_steps: int) -> float:
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=5.0).start()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "benchmarks._pipeline_runtime"])
    out: Any = ctx.Queue()
    procs = []
    try:
        with tempfile.TemporaryDirectory() as store:
            for s in range(config.stages.num_block_stages + 1):
                spec = {
                    "master": "{}:{}".format(*master.address),
                    "stage": s,
                    "config": config,
                    "store": store,
                    "num_steps": num_steps,
                    "recovery": recovery,
                }
                p = ctx.Process(target=_stage, args=(spec, out), daemon=True)
                p.start()
                procs.append(p)
            results = dict(out.get(timeout=300) for _ in procs)
        times = results[0][WARMUP:]
        return (len(times) - 1) / (times[-1] - times[0])
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
        master.stop()


def failure_free_ratio(
    config: PipelineConfig, *, num_steps: int, reps: int
) -> tuple[float, list[float], list[float]]:
    """Median steps/s with recovery over median without, and both lists (interleaved reps)."""
    with_rec: list[float] = []
    without: list[float] = []
    for _ in range(reps):
        with_rec.append(_one(config, recovery=True, num_steps=num_steps))
        without.append(_one(config, recovery=False, num_steps=num_steps))
    return statistics.median(with_rec) / statistics.median(without), with_rec, without
