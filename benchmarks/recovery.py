"""CheckFree stage recovery in the single-process pipeline simulator (issue 13, E1 and E2).

A byte-level GPT on the standard library's text, cut into the (de)embedding stage and N >= 8
block stages (``lowcomm.recovery.stages``), trained in one process with per-stage Adam and
clipping (``lowcomm.recovery.simulator``), seeded, on the CPU.

E1: one failure of a middle block stage (N // 2) at step 1000 of 3000. Methods: random re-init,
copy of the previous stage, uniform average, gradient-norm average (norms before clipping, and
the reference's after clipping), CheckFree+, rollback to a checkpoint every 50 and 100 steps (5 and 10 with --quick), no
failure. Reported per method, the mean over seeds of: the validation-loss spike (right after the
rebuild minus right before the failure), the steps to regain the pre-failure validation loss
(resolution ``eval_every``; a run that never regains it counts the steps left), and the final loss
(the mean of the last 3 evaluations, to damp one evaluation's luck).

E2: failure rates 0, 5e-4, 1e-3, 3e-3 per stage per step, every stage (the (de)embedding too) can
fail; one seeded schedule per (rate, seed) shared by every method. Stages the rules cannot rebuild
(adjacent losses; edge stages and the (de)embedding without CheckFree+) restore the last
checkpoint (every 100 steps; 10 with --quick, whose rates are 20x), so plain CheckFree pays for them in stale stages.

Steps, not seconds: the simulator does not charge the checkpoint's or the transfer's time, so the
wall-clock claims come from E3 on the multi-process runtime (``lowcomm.recovery.pipeline``, which
agrees with the simulator bit for bit: tests/recovery/test_pipeline.py): real stage processes
SIGKILLed on a seeded schedule, standbys replacing them, every uplink shaped to 100 Mbit/s, CheckFree+
against checkpoint rollback (``benchmarks/recovery_e3.py``; ``--e3`` here runs it and takes its
``speedup_vs_checkpoint_*`` claims; without it they point there).

``gradavg_vs_copy_recovery_steps`` is reported only where the setting can show it: when even a
random re-initialisation of the lost stage regains the pre-failure loss at the first evaluation
(the quick size: width 16, failure at step 12 of 24, a middle block still close to the identity
and the loss falling fast), every rule does, and the ratio would be 1.0 whatever the rule.

``--runtime`` adds ``failure_free_throughput_ratio``: the multi-process runtime (one process per
stage on loopback, a commit vote per step, the watchers' probes) against the same stages without
recovery (``benchmarks/_pipeline_runtime.py``), interleaved rep by rep.

    .venv/bin/python benchmarks/recovery.py --quick           # same code paths, tiny sizes
    .venv/bin/python benchmarks/recovery.py --workers 16      # full: 3 seeds, E1 and E2

Last line: one JSON object with the claims of issue 13.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lowcomm.launch.tinygpt import load_corpus
from lowcomm.recovery.simulator import (
    FailureSchedule,
    SimConfig,
    SimResult,
    simulate,
    standard_methods,
)
from lowcomm.recovery.stages import StageConfig

E1_METHODS = (
    "no_failure",
    "random",
    "copy",
    "uniform",
    "gradavg",
    "gradavg_after_clip",
    "checkfree_plus",
    "rollback_a",
    "rollback_b",
    "no_failure_swaps",
)
E2_METHODS = ("gradavg", "checkfree_plus", "copy", "rollback_a", "rollback_b")
E2_RATES = (0.0, 5e-4, 1e-3, 3e-3)
E3_NOTE = (
    "measured by E3 on the multi-process runtime over the shaper: benchmarks/recovery_e3.py "
    "(or this script's --e3)"
)
RUNTIME_NOTE = "measured by the multi-process runtime: this script's --runtime"


@dataclass(frozen=True)
class Job:
    experiment: str
    method: str
    seed: int
    rate: float
    config: SimConfig
    failure_step: int
    threads: int
    corpus_bytes: int
    rollback_every: tuple[int, int]
    checkpoint_every: int


def _label(method: str, rollback_every: tuple[int, int]) -> str:
    """``rollback_a`` / ``rollback_b`` are the shorter and the longer rollback interval."""
    if method in ("rollback_a", "rollback_b"):
        return f"rollback_{rollback_every[method == 'rollback_b']}"
    return method


def _config(quick: bool) -> tuple[SimConfig, int]:
    if quick:
        stages = StageConfig(num_block_stages=8, width=16, num_heads=2, context=16)
        return SimConfig(
            stages=stages,
            num_steps=24,
            batch_size=4,
            num_micro_batches=2,
            lr=3e-3,
            eval_every=3,
            num_eval_batches=2,
        ), 12
    stages = StageConfig(num_block_stages=8, width=64, num_heads=4, context=64)
    return SimConfig(
        stages=stages,
        num_steps=3000,
        batch_size=16,
        num_micro_batches=4,
        lr=1e-3,
        eval_every=10,
        num_eval_batches=8,
    ), 1000


_DATA: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _data(corpus_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if corpus_bytes not in _DATA:
        data = load_corpus(max_bytes=corpus_bytes)
        cut = int(data.numel() * 0.9)
        _DATA[corpus_bytes] = (data[:cut], data[cut:])
    return _DATA[corpus_bytes]


def run(job: Job) -> tuple[Job, SimResult]:
    torch.set_num_threads(job.threads)
    train, val = _data(job.corpus_bytes)
    methods = standard_methods(
        rollback_every=job.rollback_every, checkpoint_every=job.checkpoint_every
    )
    config = replace(job.config, seed=job.seed)
    n = config.stages.num_block_stages
    if job.experiment == "E1":
        schedule = FailureSchedule.scripted({job.failure_step: [n // 2]})
    else:  # one schedule per (rate, seed), the same for every method
        schedule = FailureSchedule.random(
            num_steps=config.num_steps, stages=range(n + 1), rate=job.rate, seed=10_000 + job.seed
        )
    return job, simulate(
        config,
        methods[_label(job.method, job.rollback_every)],
        train_data=train,
        val_data=val,
        schedule=schedule,
    )


def _final(r: SimResult) -> float:
    return statistics.fmean(r.eval_losses[-3:])


def _recovery_steps(r: SimResult, step: int, num_steps: int) -> int:
    pre = r.pre_failure[step]
    for s, loss in zip(r.eval_steps, r.eval_losses, strict=True):
        if s > step and loss <= pre:
            return s - step
    return num_steps - step  # never regained: the steps left, a lower bound


def _runtime_claim(quick: bool) -> dict[str, object]:
    """``failure_free_throughput_ratio`` measured on the multi-process runtime (``--runtime``)."""
    from benchmarks._pipeline_runtime import failure_free_ratio
    from lowcomm.recovery.pipeline import PipelineConfig

    if quick:
        stages = StageConfig(num_block_stages=3, width=16, num_heads=2, context=16)
        config = PipelineConfig(stages=stages, num_micro_batches=2, micro_batch_size=2)
        num_steps, reps = 25, 2
    else:
        stages = StageConfig(num_block_stages=8, width=64, num_heads=4, context=64)
        config = PipelineConfig(stages=stages, num_micro_batches=4, micro_batch_size=4)
        num_steps, reps = 60, 3
    config = replace(config, checkpoint_every=10_000)
    ratio, with_rec, without = failure_free_ratio(config, num_steps=num_steps, reps=reps)
    print(
        f"\nruntime, no failures: {stages.num_block_stages + 1} stage processes, steps/s with "
        f"recovery {[round(r, 2) for r in with_rec]}, without {[round(r, 2) for r in without]} "
        f"(interleaved): ratio {ratio:.4f}"
    )
    return {
        "name": "failure_free_throughput_ratio",
        "value": round(ratio, 4),
        "goal": 0.99,
        "ok": ratio >= 0.99,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, < 1 minute")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--workers", type=int, default=1, help="processes running the runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--runtime",
        action="store_true",
        help="also measure failure_free_throughput_ratio: the multi-process pipeline runtime "
        "against the same stages without recovery, one process per stage, interleaved",
    )
    parser.add_argument(
        "--e3",
        action="store_true",
        help="also run E3 (benchmarks/recovery_e3.py, --quick there too): the speedup claims over "
        "checkpoint rollback on the multi-process runtime through the shaper (adds ~1 minute "
        "with --quick, far more without)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    config, failure_step = _config(args.quick)
    seeds = range(args.seeds if args.seeds is not None else (1 if args.quick else 3))
    corpus = 300_000 if args.quick else 4_000_000
    # Quick runs are 24 steps long: checkpoints every 50 or 100 would never be taken.
    rollback, fallback = ((5, 10), 10) if args.quick else ((50, 100), 100)
    # ... and would see no failure at the real rates: --quick scales them by 20 (E2's paths run).
    rates = tuple(r * (20 if args.quick else 1) for r in E2_RATES)
    jobs = [
        Job("E1", m, s, 0.0, config, failure_step, args.threads, corpus, rollback, fallback)
        for s in seeds
        for m in E1_METHODS
    ]
    jobs += [
        Job("E2", m, s, rate, config, failure_step, args.threads, corpus, rollback, fallback)
        for s in seeds
        for rate in rates[1:]
        for m in E2_METHODS
    ]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run, jobs))
    else:
        results = [run(j) for j in jobs]
    by = {(j.experiment, j.method, j.seed, j.rate): r for j, r in results}
    steps = config.num_steps
    sc = config.stages
    print(
        f"recovery simulator: {sc.num_block_stages} block stages x {sc.layers_per_stage} layer, "
        f"width {sc.width}, context {sc.context}, {steps} steps, batch {config.batch_size} in "
        f"{config.num_micro_batches} micro-batches, seeds {list(seeds)}"
    )

    print(
        f"\nE1: block stage {sc.num_block_stages // 2} lost at step {failure_step} "
        f"(mean over seeds)"
    )
    print(f"{'method':<20}{'pre':>8}{'spike':>9}{'regain steps':>14}{'final':>9}{'lost work':>11}")
    e1: dict[str, dict[str, float]] = {}
    for m in E1_METHODS:
        rs = [by[("E1", m, s, 0.0)] for s in seeds]
        row = {"final": statistics.fmean(_final(r) for r in rs)}
        if rs[0].pre_failure:
            row["pre"] = statistics.fmean(r.pre_failure[failure_step] for r in rs)
            row["spike"] = statistics.fmean(
                r.post_recovery[failure_step] - r.pre_failure[failure_step] for r in rs
            )
            row["regain"] = statistics.fmean(_recovery_steps(r, failure_step, steps) for r in rs)
            row["lost"] = statistics.fmean(r.lost_steps for r in rs)
            print(
                f"{_label(m, rollback):<20}{row['pre']:>8.4f}{row['spike']:>+9.4f}{row['regain']:>14.1f}"
                f"{row['final']:>9.4f}{row['lost']:>11.0f}"
            )
        else:
            print(
                f"{_label(m, rollback):<20}{'-':>8}{'-':>9}{'-':>14}{row['final']:>9.4f}{'-':>11}"
            )
        e1[m] = row

    print("\nE2: final loss by failure rate per stage per step (mean over seeds; failures seen)")
    print(f"{'method':<20}" + "".join(f"{r:>16g}" for r in rates))
    e2: dict[tuple[str, float], float] = {}
    for m in (*E2_METHODS, "no_failure"):
        cells = []
        for rate in rates:
            if rate == 0.0:
                key = "no_failure_swaps" if m == "checkfree_plus" else "no_failure"
                rs = [by[("E1", key, s, 0.0)] for s in seeds]
                fails = 0.0
            elif m == "no_failure":
                rs = [by[("E1", "no_failure", s, 0.0)] for s in seeds]
                fails = 0.0
            else:
                rs = [by[("E2", m, s, rate)] for s in seeds]
                fails = statistics.fmean(len(r.reports) for r in rs)
            e2[(m, rate)] = statistics.fmean(_final(r) for r in rs)
            cells.append(f"{e2[(m, rate)]:.4f} ({fails:4.1f})")
        print(f"{_label(m, rollback):<20}" + "".join(f"{c:>16}" for c in cells))
    rule_counts: dict[str, int] = {}
    for (exp, m, _, _), r in by.items():
        if exp == "E2" and m == "gradavg":
            for _, rep in r.reports:
                rule_counts[rep.rule] = rule_counts.get(rep.rule, 0) + 1
    print(f"gradavg's rebuilds in E2, by rule: {dict(sorted(rule_counts.items()))}")

    copy_steps, grad_steps = e1["copy"]["regain"], e1["gradavg"]["regain"]
    ratio = grad_steps / copy_steps if copy_steps > 0 else None
    # The claim needs a lost stage that matters: when even a random re-initialisation regains
    # the pre-failure loss at the first evaluation (at small sizes and early in training a middle
    # block is close to the identity and the loss still falls fast), every method does, and the
    # ratio is 1.0 whatever the rule. Say so instead of reporting it.
    random_regain = e1["random"]["regain"]
    measurable = random_regain > config.eval_every
    gradavg_note = (
        ""
        if measurable
        else f"not measurable at this size: even a random re-init of the lost stage regains the "
        f"pre-failure loss at the first evaluation (spike {e1['random']['spike']:+.4f}, "
        f"{random_regain:.0f} steps)"
    )
    if not measurable:
        print(f"\ngradavg_vs_copy_recovery_steps: {gradavg_note}")
    final_1e3 = e2[("gradavg", rates[2])] / e2[("no_failure", 0.0)]
    swap_cost = e1["no_failure_swaps"]["final"] / e1["no_failure"]["final"]
    claims = [
        {
            "name": "gradavg_vs_copy_recovery_steps",
            "value": None if ratio is None or not measurable else round(ratio, 4),
            "goal": 0.5,
            "ok": measurable and ratio is not None and ratio <= 0.5,
            **({"note": gradavg_note} if gradavg_note else {}),
        },
        {
            "name": "gradavg_final_loss_vs_no_failure_1e3",
            "value": round(final_1e3, 4),
            "goal": 1.01,
            "ok": final_1e3 <= 1.01,
        },
        {
            "name": "checkfree_plus_loss_cost",
            "value": round(swap_cost, 4),
            "goal": 1.01,
            "ok": swap_cost <= 1.01,
        },
    ]
    if args.runtime:
        claims.append(_runtime_claim(args.quick))
    else:
        claims.append(
            {
                "name": "failure_free_throughput_ratio",
                "value": None,
                "goal": 0.99,
                "ok": False,
                "note": RUNTIME_NOTE,
            }
        )
    if args.e3:
        from benchmarks.recovery_e3 import run_e3

        print()
        claims += run_e3(quick=args.quick)
    else:
        for name, goal in (("speedup_vs_checkpoint_1e3", 1.15), ("speedup_vs_checkpoint_3e3", 1.6)):
            claims.append({"name": name, "value": None, "goal": goal, "ok": False, "note": E3_NOTE})
    print(f"\n{len(jobs)} runs in {time.perf_counter() - start:.1f} s")
    print(
        json.dumps(
            {"benchmark": "recovery", "quick": args.quick, "seeds": len(seeds), "claims": claims}
        )
    )


if __name__ == "__main__":
    main()
