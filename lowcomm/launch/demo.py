"""``lowcomm demo``: the main job on an embedded default, on this machine.

A master and several peer processes train a small byte-level GPT on the Python standard library's
text (no download) with async DiLoCo over an emulated slow link (lowcomm's own traffic shaper).
Half-way, one peer is killed without warning; it restarts from its own checkpoint (inner optimizer,
data position) and takes the run's current outer state from the others. Then data-parallel training (an fp32 gradient all-reduce every step)
runs over the same link for the same wall-clock time. The demo ends with a summary and a PNG plot
of loss against time (the kill and the resume marked) and against bytes sent, for both.

``lowcomm demo --pipeline`` shows the other half of fault tolerance instead: a model split into
pipeline stages, one process each, a middle stage killed mid micro-batch and rebuilt by CheckFree
from its neighbours (``pipeline_demo``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from typing import Any

from lowcomm.launch import local_run
from lowcomm.launch.local_run import Phase, format_bytes, run_phase

NAME = "demo"
HELP = (
    "run the main job on this machine: peers train a small GPT with async DiLoCo over a slow link"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    local_run.add_arguments(
        parser, peers=3, steps=240, method="async", bandwidth_mbps=20.0, latency_ms=20.0
    )
    parser.add_argument(
        "--no-kill", action="store_true", help="do not kill (and rejoin) a peer half-way"
    )
    parser.add_argument(
        "--no-data-parallel", action="store_true", help="skip the data-parallel comparison"
    )
    parser.add_argument(
        "--dp-max-seconds",
        type=float,
        default=90.0,
        help="cap on the data-parallel run's time (it gets DiLoCo's wall time, at most this)",
    )
    parser.add_argument("--plot", default="lowcomm-demo.png", help="where to write the plot")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="instead: train a pipeline of stages, one per process; kill and rebuild a stage",
    )
    parser.add_argument(
        "--pipeline-stages",
        type=int,
        default=3,
        help="with --pipeline: transformer block stages besides stage 0 (3; >= 3 for the kill)",
    )


def _plot(path: str, phases: list[Phase]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    for phase in phases:
        if not phase.curve:
            continue
        t, b, loss = zip(*phase.curve, strict=True)
        smooth, acc = [], loss[0]
        for v in loss:  # exponential smoothing so that the noisy training loss reads well
            acc = 0.8 * acc + 0.2 * v
            smooth.append(acc)
        (line,) = ax_t.plot(t, smooth, label=phase.name)
        # Every curve starts at zero bytes: DiLoCo's first MB arrive only at its first outer step.
        sent = [(0.0, smooth[0])] + [(x / 1e6, v) for x, v in zip(b, smooth, strict=True)]
        ax_b.plot(*zip(*sent, strict=True), label=phase.name, color=line.get_color())
        for when, what in phase.marks:
            ax_t.axvline(when, color=line.get_color(), linestyle=":", alpha=0.8)
            ax_t.annotate(what, (when, max(smooth)), rotation=90, va="top", ha="right", fontsize=8)
    ax_t.set_xlabel("wall-clock time (s)")
    ax_b.set_xlabel("bytes sent per peer (MB, linear up to 0.01, then log)")
    ax_b.set_xscale("symlog", linthresh=0.01)
    for ax in (ax_t, ax_b):
        ax.set_ylabel("training loss (smoothed)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("lowcomm demo: DiLoCo vs data-parallel over the same emulated link")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from lowcomm.comm import Master
    from lowcomm.launch.experiments import LM_WARMUP_STEPS
    from lowcomm.launch.peer import PeerSpec, kill_at_inner_step, outer_steps_for
    from lowcomm.launch.tinygpt import GPT

    if args.pipeline:
        from lowcomm.launch.pipeline_demo import run_pipeline_demo

        return run_pipeline_demo(args)
    if args.peers < 1:
        raise SystemExit("--peers must be >= 1")
    if args.log_level is None:
        # The comm layer narrates every connection at INFO; the demo shows its own progress.
        logging.getLogger("lowcomm.comm").setLevel(logging.ERROR)
    if args.steps < args.sync_every:
        raise SystemExit("--steps must be at least --sync-every")
    kill = not args.no_kill and args.peers >= 2
    gpt = local_run.gpt_config(args)
    try:
        outer = local_run.outer_config(args, timeout_s=60.0)
    except ValueError as exc:
        raise SystemExit(f"bad outer-loop settings: {exc}") from None
    token = os.urandom(16)
    num_params = sum(p.numel() for p in GPT(gpt).parameters())
    print(
        f"lowcomm demo: {args.peers} peers, GPT of {num_params / 1e6:.2f}M parameters on the Python "
        f"standard library's text; {args.method} DiLoCo, H={args.sync_every}, {args.quantization} "
        f"pseudo-gradients; link {args.bandwidth_mbps:g} Mbit/s, {args.latency_ms:g} ms",
        flush=True,
    )
    master = Master(("127.0.0.1", 0), token=token, heartbeat_timeout_s=5.0).start()
    address = "{}:{}".format(*master.address)
    # The one-step-delayed methods apply round k's average at the end of round k+1.
    num_outer = outer_steps_for(outer, args.steps)
    base: dict[str, Any] = dict(
        master=address,
        token=token,
        num_peers=args.peers,
        gpt=gpt,
        batch_size=args.batch_size,
        bandwidth_bps=args.bandwidth_mbps * 1e6,
        latency_ms=args.latency_ms,
        seed=args.seed,
        # The inner AdamW's warm-up: a tenth of the run, at most the default (LM_WARMUP_STEPS).
        warmup_steps=min(LM_WARMUP_STEPS, args.steps // 10),
        report_every=max(1, args.sync_every // 4),
        timeout_s=30.0,
    )
    phases: list[Phase] = []
    kill_step = args.steps // 2 + args.sync_every // 2
    ckpt_root = tempfile.mkdtemp(prefix="lowcomm-demo-")
    try:
        specs = [
            PeerSpec(
                index=i,
                outer=outer,
                outer_steps=num_outer,
                # Mid-round, so that the checkpoint of the outer step before it is on disk.
                faults=(kill_at_inner_step(kill_step),) if kill and i == args.peers - 1 else (),
                checkpoint_dir=os.path.join(ckpt_root, f"peer{i}") if kill else None,
                min_final_world=args.peers if kill else 0,
                max_outer_steps=20 * num_outer,  # room for the rejoiner to arrive on a busy box
                evaluate_at_end=(i == 0),
                **base,
            )
            for i in range(args.peers)
        ]
        diloco = run_phase(
            f"DiLoCo/{args.method}",
            specs,
            total_steps=args.steps,
            kill_index=args.peers - 1 if kill else None,
            timeout_s=1800,
        )
        phases.append(diloco)
        hashes = {r["hash"] for r in diloco.results.values()}
        if not args.no_data_parallel:
            budget = min(diloco.wall_s, args.dp_max_seconds)
            dp_specs = [
                PeerSpec(
                    index=i,
                    outer=outer,
                    mode="ddp",
                    time_budget_s=budget,
                    max_steps=args.steps,
                    evaluate_at_end=(i == 0),
                    **base,
                )
                for i in range(args.peers)
            ]
            phases.append(
                run_phase(
                    "data-parallel", dp_specs, total_steps=None, kill_index=None, timeout_s=900
                )
            )
    finally:
        master.stop()
        shutil.rmtree(ckpt_root, ignore_errors=True)
    print("\n== summary")
    for phase in phases:
        r0 = phase.results[0]
        steps = r0["inner_steps"]
        util = 1.0 - r0["comm_wait_s"] / r0["wall_s"] if r0["wall_s"] else 0.0
        print(
            f"{phase.name:>14}: {steps} steps in {r0['wall_s']:.0f} s, validation loss "
            f"{r0['val_loss']:.3f}, sent {format_bytes(r0['tx_bytes'])} per peer, "
            f"compute {100 * util:.0f}% of wall time"
        )
        for event in phase.events:
            print(f"{'':>16}{event}")
    if len(hashes) == 1:
        print(
            f"outer parameters bit-identical on all {len(diloco.results)} peers: {hashes.pop()[:16]}"
        )
    else:
        print(f"ERROR: the peers' outer parameters differ ({len(hashes)} distinct hashes)")
        return 1
    plot = _plot(args.plot, phases)
    print(f"plot: {plot}" if plot else "plot: skipped (matplotlib is not installed)")
    return 0
