"""DiLoCo family: quality at equal inner steps, and time to a late target over a 100 Mbit/s link.

Part A (quality, seeded, CPU): the calibration GPT (0.47M parameters, byte-level, 2 layers, width
128, context 64, on the standard library's text; inner AdamW lr 2e-3, betas (0.9, 0.95), weight
decay 0.1), 4 replicas of batch 16 through the real ``DiLoCo`` wrapper over an in-process
``LocalGroup``, against one worker (batch 16) and data-parallel (batch 64) at equal inner steps.

* Like for like with the published calibration (docs/outer_loop_defaults.md): no warm-up, outer
  Nesterov lr 0.7 momentum 0.9, fp32 pseudo-gradients, H=20 and H=50, 1200 steps; the share of the
  one-worker/data-parallel gap closed, against the published 62% and 51%.
* Every method at its defaults (``OuterConfig(method=m)``, nothing else set: H=50, uint8), with
  the inner AdamW's warm-up (``LM_WARMUP_STEPS``), against one worker with the same inner AdamW:
  the ratio of final losses, all of which must be below 1.

Part B (the late-target race, end to end): a 5.7M-parameter GPT as 4 real peer processes on
loopback, on the GPUs found (round-robin; else the CPU). Data-parallel all-reduces the fp32
gradient every step. Its validation loss after --ddp-steps (1000) steps is the target. 1000
data-parallel steps through the shaper take about 46 minutes, so data-parallel's loss curve comes
from a run of the same processes without the shaper, and its time per step from --ddp-sample
steps through the shaper (100 Mbit/s + 10 ms per peer; the first 2 steps left out): its time to
the target is the steps it needed times that time per step, stated as such in the table. Every
other method trains --race-steps steps through the shaper, end to end, and its time to target is
measured: peer 0 snapshots the outer parameters after each outer step with its training seconds
so far (the copies' milliseconds left out), evaluated after the race so nothing competes with a
run, and the (seconds, loss) curve is interpolated. Utilisation is 1 - (time step() spent blocked
on the network) / wall time, the mean of the 4 peers' (the least utilised peer's too); the claim's
is the steady state of async at H=100 (from the first outer step applied to the end of the loop).
``--budget-s`` skips the methods that would start after that many seconds of part B (the table
says which), so that one bounded call always ends with its claims line.

    .venv/bin/python benchmarks/diloco.py --quick    # same code paths, tiny sizes (< 1 min)
    # part A here (CPU, seeded, about 25 min on 2 quiet cores), part B on a GPU host:
    .venv/bin/python benchmarks/diloco.py --jobs 2 --threads 1 --save-part-a a.json --skip-part-b
    timeout 560 python benchmarks/diloco.py --load-part-a a.json --methods "diloco,async h=100,async tau"
    timeout 330 python benchmarks/diloco.py --load-part-a a.json --methods streaming

Last line: one JSON object with the claims of issue 15 (and issue 6's utilisation claim).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lowcomm.diloco import METHODS, OuterConfig
from lowcomm.launch.experiments import (
    LM_BETAS,
    LM_WARMUP_STEPS,
    LM_WEIGHT_DECAY,
    Corpus,
    RunResult,
    simulate,
)
from lowcomm.launch.tinygpt import GPT, GPTConfig

TOKEN = b"diloco-benchmark-0123456789abcdef"
CORPUS_BYTES = 2_000_000  # part B's peers train on the first 2 MB of the corpus


# ------------------------------------------------------------------------------------ part A
ONE, DDP, ONE_WARM = "one worker (B)", "data-parallel (4B)", "one worker (B), warm-up"
PUBLISHED = {20: 0.62, 50: 0.51}  # share of the gap closed by the published calibration


def like_for_like_name(h: int) -> str:
    return f"DiLoCo H={h} like-for-like"


def defaults_name(method: str) -> str:
    return f"{method} at defaults"


def like_for_like_hs(quick: bool) -> dict[int, int]:
    """The published H -> the H run (--quick shortens the rounds to fit its 60 steps)."""
    return {20: 10, 50: 20} if quick else {20: 20, 50: 50}


def part_a_plan(args: argparse.Namespace) -> list[tuple[str, int, OuterConfig | None, int]]:
    """(row, replicas, outer config or None for one model, inner warm-up steps)."""
    warm = 10 if args.quick else args.warmup
    hs = like_for_like_hs(args.quick).values()
    plan: list[tuple[str, int, OuterConfig | None, int]] = [(ONE, 1, None, 0), (DDP, 4, None, 0)]
    for h in hs:
        # The published calibration's outer loop: Nesterov lr 0.7, momentum 0.9, fp32.
        lfl = OuterConfig(sync_every=h, outer_lr=0.7, outer_momentum=0.9, quantization="none")
        plan.append((like_for_like_name(h), 4, lfl, 0))
    plan.append((ONE_WARM, 1, None, warm))
    for method in METHODS:
        # Everything at its default; --quick shortens the round to fit its 60 steps.
        kw: dict[str, Any] = {"sync_every": 10} if args.quick else {}
        outer = OuterConfig(method=method, **kw)  # type: ignore[arg-type]
        plan.append((defaults_name(method), 4, outer, warm))
    return plan


def part_a(args: argparse.Namespace) -> dict[str, RunResult]:
    if args.quick:
        corpus = Corpus.load(max_bytes=1_000_000)
        gpt = GPTConfig(num_layers=1, width=32, num_heads=2, context=32)
        steps = 60
    else:
        corpus = Corpus.load()
        gpt = GPTConfig()  # the calibration model: 2 layers, width 128, context 64
        steps = args.steps
    # torch's default initialisation, as in the published calibration's plain script (GPT's own
    # std-0.02 init learns slower at this width: docs/outer_loop_defaults.md).
    common: dict[str, Any] = dict(
        corpus=corpus, gpt=gpt, steps=steps, batch_size=16, lr=2e-3, init="torch"
    )
    plan = part_a_plan(args)
    print(
        f"== part A: {sum(p.numel() for p in GPT(gpt).parameters()) / 1e6:.2f}M params, "
        f"{steps} inner steps, batch 16 per replica, AdamW lr 2e-3 betas {LM_BETAS} "
        f"weight decay {LM_WEIGHT_DECAY}",
        flush=True,
    )
    if args.jobs > 1:
        # Independent seeded runs: in parallel processes on a many-core host, same results.
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [
                pool.submit(_simulate_job, args.threads, name, reps, outer, warm, common)
                for name, reps, outer, warm in plan
            ]
            results = [f.result() for f in futures]
    else:
        results = [
            simulate(name, num_replicas=reps, outer=outer, warmup_steps=warm, **common)
            for name, reps, outer, warm in plan
        ]
    return {r.name: r for r in results}


def _simulate_job(
    threads: int,
    name: str,
    reps: int,
    outer: OuterConfig | None,
    warm: int,
    common: dict[str, Any],
) -> RunResult:
    torch.set_num_threads(threads)
    return simulate(name, num_replicas=reps, outer=outer, warmup_steps=warm, **common)


def report_part_a(args: argparse.Namespace, runs: dict[str, RunResult]) -> dict[str, float]:
    """Prints part A's tables; returns the claims' values."""
    for r in runs.values():
        print(
            f"{r.name:>30}: val loss {r.val_loss:.4f}  ({r.seconds:.0f} s, "
            f"{r.tx_bytes_per_peer / 1e6:.2f} MB sent per peer)",
            flush=True,
        )
    one, ddp = runs[ONE].val_loss, runs[DDP].val_loss
    print(f"\nlike for like (no warm-up; one worker {one:.4f}, data-parallel {ddp:.4f}):")
    print(f"{'H':>4} {'DiLoCo loss':>12} {'gap closed':>11} {'published':>10}")
    out: dict[str, float] = {}
    for (h, published), key in zip(PUBLISHED.items(), ("h20", "h50"), strict=True):
        hh = like_for_like_hs(args.quick)[h]
        loss = runs[like_for_like_name(hh)].val_loss
        gap = (one - loss) / (one - ddp) if one != ddp else float("nan")
        out[key] = gap
        print(f"{hh:>4} {loss:12.4f} {gap:11.1%} {published:10.0%}")
    base = runs[ONE_WARM].val_loss
    print(
        f"\nevery method at its defaults vs one worker (both with warm-up; one worker {base:.4f}):"
    )
    ratios = {m: runs[defaults_name(m)].val_loss / base for m in METHODS}
    for m in METHODS:
        print(f"{m:>18} {runs[defaults_name(m)].val_loss:8.4f} {ratios[m]:8.4f}")
    out["worst"] = max(ratios.values())
    return out


# ------------------------------------------------------------------------------------ part B
def _devices() -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def _pool_worker(tasks: Any, events: Any) -> None:
    from lowcomm.launch.peer import run_peer

    while (spec := tasks.get()) is not None:
        run_peer(spec, events)  # exits the worker after reporting an error: the pool is killed


class _PeerPool:
    """4 worker processes reused from run to run, each running one peer of every run.

    A run does not pay for 4 fresh interpreters importing torch and starting CUDA. On any failure
    the workers are killed, rather than left waiting in a collective for their timeouts.
    """

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.events: Any = ctx.Queue()
        self.tasks: list[Any] = [ctx.Queue() for _ in range(size)]
        self.procs = [
            ctx.Process(target=_pool_worker, args=(q, self.events), daemon=True) for q in self.tasks
        ]
        for proc in self.procs:
            proc.start()

    def __enter__(self) -> _PeerPool:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            for q in self.tasks:
                q.put(None)
            for proc in self.procs:
                proc.join(timeout=30)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()

    def start(self, specs: list[Any]) -> None:
        for q, spec in zip(self.tasks, specs, strict=True):
            q.put(spec)

    def next_event(self, timeout_s: float) -> tuple[str, int, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.events.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, proc in enumerate(self.procs) if not proc.is_alive()]
                if dead:
                    raise SystemExit(f"peer workers {dead} died without reporting") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no event from the peers in {timeout_s} s") from None


def _race_run(
    name: str,
    *,
    gpt: GPTConfig,
    mode: str,
    outer: OuterConfig,
    steps: int,
    devices: list[str],
    pool: _PeerPool,
    shaped: bool = True,
    snapshot_every: int = 10,
) -> dict[str, Any]:
    """One method end to end: 4 peers (through the shaper); peer 0's snapshots, unevaluated."""
    from lowcomm.comm import Master
    from lowcomm.launch.peer import PeerSpec, outer_steps_for

    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=60.0).start()
    spec = dict(
        master="{}:{}".format(*master.address),
        token=TOKEN,
        num_peers=4,
        outer=outer,
        gpt=gpt,
        batch_size=16,
        outer_steps=outer_steps_for(outer, steps),
        max_steps=steps,
        mode=mode,
        bandwidth_bps=100e6 if shaped else None,
        latency_ms=10.0 if shaped else 0.0,
        corpus_bytes=CORPUS_BYTES,
        report_every=10_000,
        snapshots=True,
        snapshot_every=snapshot_every,
        timeout_s=outer.timeout_s,
    )
    done: dict[int, dict[str, Any]] = {}
    snapshots: list[dict[str, Any]] = []
    try:
        pool.start(
            [PeerSpec(index=i, device=devices[i % len(devices)], **spec) for i in range(4)]  # type: ignore[arg-type]
        )
        while len(done) < 4:
            kind, index, payload = pool.next_event(timeout_s=1800)
            if kind == "error":
                raise SystemExit(f"{name}: peer {index} failed:\n{payload}")
            if kind == "snapshot":
                snapshots.append(payload)
            if kind == "done":
                done[index] = payload
    finally:
        master.stop()
    assert len({r["hash"] for r in done.values()}) == 1, f"{name}: peers' parameters differ"
    zero = done[0]
    whole = [1.0 - r["comm_wait_s"] / r["wall_s"] for r in done.values()]
    steady = [1.0 - r["steady_wait_s"] / r["steady_s"] for r in done.values()]
    return {
        "name": name,
        "snapshots": snapshots,
        "steps": zero["inner_steps"],
        "wall_s": zero["wall_s"],
        # The group's: compute seconds over peer seconds, the mean of the 4 peers'. A peer that
        # outruns the others waits for them at the all-reduce; the least utilised is shown too.
        "utilisation": sum(whole) / len(whole),
        # Steady state: from the first outer step applied to the end of the loop, without the
        # final drain (finish() waiting for the last all-reduce, once per run).
        "steady_utilisation": sum(steady) / len(steady),
        "steady_min": min(steady),
        "tx_bytes": max(r["tx_bytes"] for r in done.values()),
        # Time per step not blocked on the network, as in this run (4 peers may share a device).
        "compute_ms": 1e3 * (zero["wall_s"] - zero["comm_wait_s"]) / zero["inner_steps"],
    }


def _evaluate_snapshots(
    snapshots: list[dict[str, Any]], gpt: GPTConfig, device: str, num_batches: int
) -> list[tuple[int, float, float]]:
    """(inner step, training seconds, validation loss) for each of peer 0's snapshots."""
    from torch.nn.utils import vector_to_parameters

    from lowcomm.launch.experiments import evaluate

    corpus = Corpus.load(max_bytes=CORPUS_BYTES)  # the peers' corpus, so their validation split
    probe = GPT(gpt).to(device)
    curve = []
    for snap in snapshots:
        vector_to_parameters(torch.from_numpy(snap["params"]).to(device), probe.parameters())
        loss = evaluate(probe, corpus, num_batches=num_batches)
        curve.append((snap["step"], snap["seconds"], loss))
    return curve


def time_to(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Training seconds at which the (linearly interpolated) validation curve reaches target."""
    prev: tuple[float, float] | None = None
    for _, seconds, loss in curve:
        if loss <= target:
            if prev is None:
                return seconds
            s0, l0 = prev
            return s0 + (seconds - s0) * (l0 - target) / max(l0 - loss, 1e-12)
        prev = (seconds, loss)
    return None


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    devices = [args.device] if args.device != "auto" else _devices()
    if args.quick:
        gpt = GPTConfig(num_layers=1, width=64, num_heads=2, context=32)
        ddp_steps, sample, race, h, h_long, eval_batches = 12, 4, 36, 6, 12, 1
    else:
        gpt = GPTConfig(num_layers=7, width=256, num_heads=4, context=64)
        ddp_steps, sample, race = args.ddp_steps, args.ddp_sample, args.race_steps
        h, h_long, eval_batches = args.sync_every, 100, 8
    numel = sum(p.numel() for p in GPT(gpt).parameters())
    print(
        f"\n== part B: {numel / 1e6:.2f}M-parameter GPT, 4 peers on {', '.join(devices)}, "
        f"link 100 Mbit/s + 10 ms; the target is data-parallel's validation loss after "
        f"{ddp_steps} steps; the other methods get {race} steps through the shaper",
        flush=True,
    )
    # The methods race at their defaults, with H set (the defaults' 50 is for long runs), in the
    # order --budget-s keeps them: the likely fastest first, then the utilisation claim's row.
    plan: list[tuple[str, OuterConfig, int]] = [
        (f"DiLoCo H={h} uint8", OuterConfig(sync_every=h), race),
        # A round long enough to hide the all-reduce behind a GPU's inner steps, and enough
        # rounds for a steady state: the utilisation claim's row. It keeps the full-round delay
        # (apply_after_steps=H; the default applies a tenth of a round late, for quality).
        (
            f"async H={h_long} uint8",
            # Momentum 0: with a full round of delay momentum diverged (OuterConfig warns).
            OuterConfig(
                method="async", sync_every=h_long, apply_after_steps=h_long, outer_momentum=0.0
            ),
            max(race, 6 * h_long),
        ),
        (
            f"async tau=2 H={h} uint8",
            OuterConfig(method="async", sync_every=h, apply_after_steps=2),
            race,
        ),
        (f"Streaming H={h} uint8", OuterConfig(method="streaming", sync_every=h), race),
    ]
    t_start = time.monotonic()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with _PeerPool(4) as pool:

        def run(name: str, mode: str, outer: OuterConfig, n: int, **kw: Any) -> dict[str, Any]:
            outer = dataclasses.replace(outer, timeout_s=300.0)
            r = _race_run(
                name, gpt=gpt, mode=mode, outer=outer, steps=n, devices=devices, pool=pool, **kw
            )
            print(f"  {name}: {r['steps']} steps in {r['wall_s']:.1f} s", flush=True)
            return r

        # Data-parallel's curve, without the shaper (the same processes and code otherwise) ...
        every = max(1, ddp_steps // 10)
        ddp = run(
            "data-parallel fp32 (no shaper)",
            "ddp",
            OuterConfig(),
            ddp_steps,
            shaped=False,
            snapshot_every=every,
        )
        # ... and its time per step through the shaper, on a sample of steps.
        probe = run("data-parallel fp32 (sample)", "ddp", OuterConfig(), sample, snapshot_every=1)
        marks = [
            snap["seconds"] for snap in sorted(probe.pop("snapshots"), key=lambda d: d["step"])
        ]
        skip = min(2, len(marks) - 2)
        ddp_step_s = (
            (marks[-1] - marks[skip - 1]) / (len(marks) - skip) if skip else marks[-1] / len(marks)
        )
        for name, outer, n in plan:
            if args.methods and not any(name.lower().startswith(m) for m in args.methods):
                continue
            if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
                skipped.append(name)
                continue
            rows.append(run(name, "diloco", outer, n))
    for r in [ddp, *rows]:  # after the race, so that no evaluation competes with a run
        r["curve"] = _evaluate_snapshots(r.pop("snapshots"), gpt, devices[0], eval_batches)
    target = ddp["curve"][-1][2]
    # Data-parallel's clock: its steps times its measured time per step through the shaper.
    ddp["curve"] = [(step, step * ddp_step_s, loss) for step, _, loss in ddp["curve"]]
    ddp["time"] = time_to(ddp["curve"], target)
    print(
        f"\ntarget loss: {target:.4f} (data-parallel's after {ddp_steps} steps). Data-parallel's "
        f"time = its steps x {ddp_step_s:.3f} s per step, measured through the shaper on "
        f"{sample} steps ({probe['compute_ms']:.0f} ms of them off the network); "
        f"without the shaper its {ddp_steps} steps took {ddp['wall_s']:.1f} s"
    )
    print(
        f"{'method':>30} {'time to target':>15} {'steps to it':>12} {'final loss':>11} "
        f"{'s/step':>7} {'compute ms':>11} {'utilisation':>12} {'steady':>7} {'(min)':>6} "
        f"{'MB sent/peer/step':>18}"
    )
    print(
        f"{'data-parallel fp32':>30} {ddp['time']:13.1f} s {steps_to(ddp['curve'], target):12.0f} "
        f"{target:11.4f} {ddp_step_s:7.3f} {'':>11} {'':>12} {'':>7} {'':>6} "
        f"{probe['tx_bytes'] / probe['steps'] / 1e6:18.3f}"
    )
    for r in rows:
        r["time"] = time_to(r["curve"], target)
        st = steps_to(r["curve"], target)
        tt = "not reached" if r["time"] is None else f"{r['time']:.1f} s"
        sts = "-" if st is None else f"{st:.0f}"
        print(
            f"{r['name']:>30} {tt:>15} {sts:>12} {r['curve'][-1][2]:11.4f} "
            f"{r['wall_s'] / r['steps']:7.3f} {r['compute_ms']:11.1f} {r['utilisation']:12.3f} "
            f"{r['steady_utilisation']:7.3f} {r['steady_min']:6.3f} "
            f"{r['tx_bytes'] / r['steps'] / 1e6:18.3f}"
        )
    for name in skipped:
        print(f"{name:>30} skipped: part B's --budget-s {args.budget_s} s had passed")
    best = min((r["time"] for r in rows if r["time"] is not None), default=None)
    speedup = None if ddp["time"] is None or best is None else ddp["time"] / best
    print(f"speedup over data-parallel: {'-' if speedup is None else f'{speedup:.1f}x'}")
    util = next((r["steady_utilisation"] for r in rows if r["name"].startswith("async H=")), None)
    return {
        "speedup": speedup,
        "utilisation": util,
        "bytes_per_step": {r["name"]: r["tx_bytes"] / r["steps"] for r in rows},
    }


def steps_to(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Inner steps at which the (linearly interpolated) validation curve reaches target."""
    return time_to([(step, float(step), loss) for step, _, loss in curve], target)


def _claim(name: str, value: float | None, goal: float, ok: bool) -> dict[str, Any]:
    return {
        "name": name,
        "value": None if value is None else round(value, 4),
        "goal": goal,
        "ok": ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, same code paths")
    parser.add_argument("--steps", type=int, default=1200, help="inner steps in part A (1200)")
    parser.add_argument(
        "--warmup", type=int, default=LM_WARMUP_STEPS, help="inner warm-up of the defaults rows"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per part A run")
    parser.add_argument("--jobs", type=int, default=1, help="part A runs in parallel processes")
    parser.add_argument("--save-part-a", metavar="JSON", help="write part A's runs to this file")
    parser.add_argument("--load-part-a", metavar="JSON", help="reuse part A's runs from this file")
    parser.add_argument("--skip-part-b", action="store_true", help="part A only (no claims line)")
    parser.add_argument(
        "--device",
        default="auto",
        help="where part B's peers train: auto (every GPU in turn, else cpu), cpu, cuda:0 ...",
    )
    parser.add_argument("--sync-every", type=int, default=20, help="part B: H (20)")
    parser.add_argument(
        "--ddp-steps", type=int, default=1000, help="part B: data-parallel's steps (1000)"
    )
    parser.add_argument(
        "--ddp-sample", type=int, default=12, help="part B: data-parallel steps through the shaper"
    )
    parser.add_argument(
        "--race-steps", type=int, default=2500, help="part B: every other method's steps (2500)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="part B: start no method after this long"
    )
    parser.add_argument(
        "--methods",
        type=lambda s: [m.strip().lower() for m in s.split(",") if m.strip()],
        default=[],
        help="part B: race only the rows whose names start with these (comma-separated, e.g. "
        "'diloco,async h=100'); default: all",
    )
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.load_part_a:
        # Part A is seeded CPU work: its curves can be computed on one host and composed with
        # part B's timings on another (a GPU host) without changing what they mean.
        saved = json.loads(Path(args.load_part_a).read_text())
        runs = {
            r["name"]: RunResult(**{**r, "curve": [tuple(c) for c in r["curve"]]}) for r in saved
        }
        print(f"== part A: loaded {len(runs)} runs from {args.load_part_a}", flush=True)
    else:
        runs = part_a(args)
    if args.save_part_a:
        Path(args.save_part_a).write_text(json.dumps([vars(r) for r in runs.values()]))
    a = report_part_a(args, runs)
    if args.skip_part_b:
        return
    b = part_b(args)
    util = b["utilisation"]
    claims = [
        _claim("defaults_worst_vs_one_worker", a["worst"], 1.0, a["worst"] < 1.0),
        _claim("gap_closed_h20_like_for_like", a["h20"], 0.62, a["h20"] >= 0.62),
        _claim("gap_closed_h50_like_for_like", a["h50"], 0.51, a["h50"] >= 0.51),
        _claim(
            "speedup_vs_ddp_100mbit_late_target",
            b["speedup"],
            10.0,
            b["speedup"] is not None and b["speedup"] >= 10.0,
        ),
        _claim("async_compute_utilisation", util, 0.95, util is not None and util >= 0.95),
    ]
    print(
        json.dumps(
            {
                "benchmark": "diloco",
                "quick": args.quick,
                "devices": args.device,
                "bytes_per_peer_per_step": b["bytes_per_step"],
                "claims": claims,
            }
        )
    )


if __name__ == "__main__":
    main()
