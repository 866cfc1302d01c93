"""``lowcomm demo --pipeline``: a model split into pipeline stages, one stage killed and rebuilt.

A master and one process per stage (``lowcomm.recovery.StagePeer``; stage 0 holds the
(de)embedding, the data and the loss, stages 1..N one transformer block each) train a byte-level
GPT on the Python standard library's text. Half-way, a middle block stage is killed without
warning in the middle of a micro-batch: every other stage aborts the step (the master evicts the
dead peer, each stage's watcher sees the membership move), the step is voted down everywhere, a
replacement process joins through the ordinary join path and is rebuilt by CheckFree from its two
neighbours (their gradient-norm weighted average), and the step is retried. Every event is
printed with its stage, the rule and the seconds it took (docs/recovery.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lowcomm.comm import CommConfig, Communicator, Master
from lowcomm.faults import KILLED_EXIT_CODE, FaultInjector
from lowcomm.launch.tinygpt import load_corpus, sample_batch
from lowcomm.recovery import PipelineConfig, StagePeer, StageStore
from lowcomm.recovery.stages import StageConfig

__all__ = ["run_pipeline_demo"]

# The first Adam of a process imports torch's compiler stack (seconds): once, in the forkserver
# that preloads this module, so that a replacement stage starts in well under a second.
torch.optim.Adam([torch.zeros(1, requires_grad=True)])

_CORPUS_BYTES = 2_000_000


def _stage_main(spec: dict[str, Any], events: Any) -> None:
    """One stage process: joins the master, trains, reports every event to ``events``."""
    torch.set_num_threads(1)
    logging.getLogger("lowcomm").setLevel(logging.ERROR)
    stage, config = spec["stage"], spec["config"]
    faults = None
    if spec.get("kill_step") is not None:
        faults = FaultInjector()

        def mark(context: Any) -> None:  # the moment of the kill, durable before the process dies
            with open(spec["kill_file"], "w") as f:
                f.write(repr(time.time()))
                f.flush()
                os.fsync(f.fileno())

        faults.inject(
            "pipeline.micro_batch",
            kill=True,
            call=mark,
            where={"step": spec["kill_step"], "mb": 0, "phase": "forward"},
        )
    batches = None
    if stage == 0:
        corpus = load_corpus(max_bytes=_CORPUS_BYTES)
        size = config.micro_batch_size * config.num_micro_batches

        def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:  # a retry reads the same
            gen = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + step)
            return sample_batch(
                corpus, batch_size=size, context=config.stages.context, generator=gen
            )

    comm = Communicator(
        spec["master"],
        peer_group=stage,
        token=spec["token"],
        config=CommConfig(timeout_s=config.timeout_s, poll_s=0.1),
    )
    peer = StagePeer(
        comm,
        config,
        store=StageStore(spec["store"]),
        batches=batches,
        replacement=spec["replacement"],
        faults=faults,
        on_event=lambda kind, info: events.put((kind, stage, info)),
    )
    try:
        peer.run(spec["steps"])
    except BaseException:
        events.put(("error", stage, traceback.format_exc()))
        raise
    finally:
        comm.close()


def _describe(kind: str, stage: int, info: dict[str, Any], killed_at: float | None) -> str | None:
    since = ""
    if killed_at is not None and "time" in info:
        since = f" ({info['time'] - killed_at:.2f} s after the kill)"
    if kind == "aborted":
        return f"stage {stage} aborted step {info['step']}{since}: {info['reason']}"
    if kind == "recovered":
        weights = ", ".join(f"{w:.3g}" for w in info["weights"])
        return (
            f"stage {stage} rebuilt at step {info['step']} by rule {info['rule']} from "
            f"{', '.join(info['sources'])} (weights {weights}: gradient norms), {info['received_bytes'] / 1e3:.1f} "
            f"kB received, in {info['seconds']:.3f} s"
        )
    return None


def run_pipeline_demo(args: argparse.Namespace) -> int:
    """The ``--pipeline`` mode of ``lowcomm demo`` (its flags: --pipeline-stages, --steps,
    --width, --context, --batch-size, --seed, --no-kill); see the module docstring."""
    n = args.pipeline_stages
    if n < 1 or args.steps < 2:
        raise SystemExit("--pipeline-stages must be >= 1 and --steps >= 2")
    kill = not args.no_kill
    if kill and n < 3:
        raise SystemExit(
            "the kill needs a middle block stage: --pipeline-stages >= 3 (or --no-kill)"
        )
    if args.log_level is None:
        logging.getLogger("lowcomm.comm").setLevel(logging.ERROR)
    try:
        config = PipelineConfig(
            stages=StageConfig(
                num_block_stages=n,
                width=args.width,
                num_heads=math.gcd(args.width, 4),
                context=args.context,
            ),
            num_micro_batches=2,
            micro_batch_size=max(1, args.batch_size // 2),
            lr=3e-3,
            checkpoint_every=max(1, args.steps // 4),
            timeout_s=30.0,
        )
    except ValueError as exc:
        raise SystemExit(f"bad pipeline settings: {exc}") from None
    victim = (n + 1) // 2
    kill_step = args.steps // 2
    token = os.urandom(16)
    master = Master(("127.0.0.1", 0), token=token, heartbeat_timeout_s=5.0).start()
    root = Path(tempfile.mkdtemp(prefix="lowcomm-pipeline-demo-"))
    base = {
        "master": "{}:{}".format(*master.address),
        "token": token,
        "config": config,
        "store": str(root / "store"),
        "steps": args.steps,
        "seed": args.seed,
        "kill_file": str(root / "killed"),
    }
    print(
        f"lowcomm demo --pipeline: {n + 1} stage processes (stage 0: embedding, head, data and "
        f"loss; stages 1..{n}: one block each, width {args.width}); {args.steps} steps of 2 "
        f"micro-batches; " + (f"stage {victim} killed at step {kill_step}" if kill else "no kill"),
        flush=True,
    )
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lowcomm.launch.pipeline_demo"])
    events: Any = ctx.Queue()
    procs: dict[str, Any] = {}

    def start(stage: int, *, replacement: bool) -> None:
        spec = {**base, "stage": stage, "replacement": replacement}
        if kill and stage == victim and not replacement:
            spec["kill_step"] = kill_step
        name = f"{'replacement' if replacement else 'stage'}{stage}"
        procs[name] = ctx.Process(target=_stage_main, args=(spec, events), daemon=True)
        procs[name].start()

    start_time = time.monotonic()
    killed_at: float | None = None
    done: set[int] = set()
    last_loss = float("nan")
    try:
        for s in range(n + 1):
            start(s, replacement=False)
        while len(done) < n + 1:
            if time.monotonic() - start_time > 900:
                raise SystemExit(f"the pipeline did not finish in 900 s (done: {sorted(done)})")
            target = procs.get(f"stage{victim}")
            if kill and killed_at is None and target is not None and not target.is_alive():
                if target.exitcode != KILLED_EXIT_CODE:
                    raise SystemExit(f"stage {victim} exited with {target.exitcode}, not the kill")
                killed_at = float((root / "killed").read_text())
                print(
                    f"stage {victim} killed at step {kill_step}, mid micro-batch 0 (no warning); "
                    "starting a replacement process",
                    flush=True,
                )
                start(victim, replacement=True)
            try:
                kind, stage, info = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "error":
                raise SystemExit(f"stage {stage} failed:\n{info}")
            if kind == "done":
                done.add(stage)
            elif kind == "committed" and stage == 0:
                last_loss = info["loss"]
                step = info["step"]
                if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
                    print(f"step {step:>4}: loss {last_loss:.3f}", flush=True)
                if killed_at is not None and step == kill_step:
                    print(
                        f"step {kill_step} retried and committed (voted by every stage) "
                        f"{info['time'] - killed_at:.2f} s after the kill",
                        flush=True,
                    )
            else:
                line = _describe(kind, stage, info, killed_at)
                if line:
                    print(line, flush=True)
        for p in procs.values():
            p.join(timeout=20)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        master.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"pipeline finished {args.steps} steps in {time.monotonic() - start_time:.1f} s; "
        f"final loss {last_loss:.3f}"
    )
    return 0
