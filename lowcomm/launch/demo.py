"""``lowcomm demo``: the main job on an embedded default, on this machine.

A master and several peer processes train a small byte-level GPT on the Python standard library's
text (no download) with async DiLoCo over an emulated slow link (lowcomm's own traffic shaper).
Half-way, one peer is killed without warning; a new process rejoins in its place and receives the
outer state from the others. Then data-parallel training (an fp32 gradient all-reduce every step)
runs over the same link for the same wall-clock time. The demo ends with a summary and a PNG plot
of loss against time and against bytes sent, for both.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

NAME = "demo"
HELP = (
    "run the main job on this machine: peers train a small GPT with async DiLoCo over a slow link"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=3, help="number of local peers (default 3)")
    parser.add_argument("--steps", type=int, default=240, help="inner steps per peer (default 240)")
    parser.add_argument(
        "--sync-every", type=int, default=20, help="inner steps per outer step (20)"
    )
    parser.add_argument(
        "--method",
        default="async",
        choices=("diloco", "async", "streaming", "co2", "delayed_nesterov"),
        help="outer loop (default async)",
    )
    parser.add_argument("--quantization", default="uint8", help="pseudo-gradient codec (uint8)")
    parser.add_argument(
        "--bandwidth-mbps", type=float, default=20.0, help="emulated link, Mbit/s per peer (20)"
    )
    parser.add_argument("--latency-ms", type=float, default=20.0, help="one-way latency (20 ms)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (2)")
    parser.add_argument("--width", type=int, default=128, help="model width (128: 0.47M params)")
    parser.add_argument("--context", type=int, default=64, help="context length in bytes (64)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per peer step (16)")
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
    parser.add_argument("--seed", type=int, default=0)


@dataclass
class _Phase:
    name: str
    curve: list[tuple[float, float, float]] = field(default_factory=list)  # (s, bytes, loss)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _context() -> Any:
    # A forkserver with torch and lowcomm preloaded starts a peer in well under a second, so a
    # rejoining peer arrives while the others still train.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lowcomm.launch.peer"])
    return ctx


def _run_phase(
    name: str,
    specs: list[Any],
    *,
    total_steps: int | None,
    kill_index: int | None,
    timeout_s: float,
) -> _Phase:
    from lowcomm.launch.peer import run_peer

    ctx = _context()
    events: Any = ctx.Queue()
    procs = {s.index: ctx.Process(target=run_peer, args=(s, events), daemon=True) for s in specs}
    by_index = {s.index: s for s in specs}
    phase = _Phase(name)
    start = time.perf_counter()
    for p in procs.values():
        p.start()
    latest: dict[int, dict[str, Any]] = {}
    restarted = False
    tty = sys.stdout.isatty()
    last_print = 0.0
    try:
        while len(phase.results) < len(specs):
            if time.perf_counter() - start > timeout_s:
                raise SystemExit(f"{name}: did not finish within {timeout_s:.0f} s")
            try:
                kind, index, payload = events.get(timeout=0.5)
            except queue.Empty:
                kind = ""
            if kind == "error":
                raise SystemExit(f"{name}: peer {index} failed:\n{payload}")
            if kind == "done":
                phase.results[index] = payload
            if kind == "late":
                msg = f"peer {index} came back after the others had finished: nothing to rejoin"
                phase.events.append(msg)
                print(msg, flush=True)
                specs = [s for s in specs if s.index != index]
            if kind == "progress":
                latest[index] = payload
                if index == 0:
                    phase.curve.append((payload["elapsed_s"], payload["tx_bytes"], payload["loss"]))
                    now = time.perf_counter()
                    if tty or now - last_print > 5.0:
                        last_print = now
                        _progress(name, payload, latest, total_steps, tty)
            if kill_index is not None and not restarted:
                proc = procs[kill_index]
                if not proc.is_alive() and proc.exitcode == 17:
                    step = by_index[kill_index].die_at_inner_step
                    msg = (
                        f"peer {kill_index} killed at inner step {step}; the others carry on, "
                        "a new process rejoins in its place"
                    )
                    phase.events.append(msg)
                    print(("\n" if tty else "") + f"!! {msg}", flush=True)
                    spec = replace(by_index[kill_index], joining=True, die_at_inner_step=None)
                    procs[kill_index] = ctx.Process(
                        target=run_peer, args=(spec, events), daemon=True
                    )
                    procs[kill_index].start()
                    restarted = True
            for i, proc in procs.items():
                if (
                    not proc.is_alive()
                    and proc.exitcode not in (0, 17, None)
                    and i not in phase.results
                ):
                    raise SystemExit(f"{name}: peer {i} exited with code {proc.exitcode}")
    finally:
        for proc in procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    if tty:
        print()
    phase.wall_s = time.perf_counter() - start
    return phase


def _progress(
    name: str,
    payload: dict[str, Any],
    latest: dict[int, dict[str, Any]],
    total_steps: int | None,
    tty: bool,
) -> None:
    tok_s = sum(p["tokens_per_s"] for p in latest.values())
    step = payload["step"]
    if total_steps:
        total_steps = max(total_steps, step)  # runs on while waiting for a rejoining peer
        done = min(1.0, step / total_steps)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        where = f"[{bar}] step {step}/{total_steps}"
    else:
        where = f"step {step}"
    line = (
        f"{name:>13} {where} | loss {payload['loss']:.3f} | {tok_s:,.0f} tok/s | "
        f"sent {_fmt_bytes(payload['tx_bytes'])}/peer | peers {payload['world_size']}"
    )
    print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)


def _plot(path: str, phases: list[_Phase]) -> str | None:
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
        ax_t.plot(t, smooth, label=phase.name)
        sent = [(x / 1e6, v) for x, v in zip(b, smooth, strict=True) if x > 0]
        if sent:
            ax_b.plot(*zip(*sent, strict=True), label=phase.name)
    ax_t.set_xlabel("wall-clock time (s)")
    ax_b.set_xlabel("bytes sent per peer (MB, log)")
    ax_b.set_xscale("log")
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
    from lowcomm.diloco import OuterConfig
    from lowcomm.launch.peer import PeerSpec, outer_steps_for
    from lowcomm.launch.tinygpt import GPTConfig

    if args.peers < 1:
        raise SystemExit("--peers must be >= 1")
    if args.log_level is None:
        # The comm layer narrates every connection at INFO; the demo shows its own progress.
        logging.getLogger("lowcomm.comm").setLevel(logging.ERROR)
    if args.steps < args.sync_every:
        raise SystemExit("--steps must be at least --sync-every")
    kill = not args.no_kill and args.peers >= 2
    num_heads = max(1, args.width // 32)
    gpt = GPTConfig(
        num_layers=args.layers, width=args.width, num_heads=num_heads, context=args.context
    )
    try:
        outer = OuterConfig(
            method=args.method,
            sync_every=args.sync_every,
            quantization=args.quantization,
            num_fragments=2 if args.sync_every % 2 == 0 else 1,
            timeout_s=60.0,
        )
    except ValueError as exc:
        raise SystemExit(f"bad outer-loop settings: {exc}") from None
    token = os.urandom(16)
    num_params = sum(
        p.numel()
        for p in __import__("lowcomm.launch.tinygpt", fromlist=["GPT"]).GPT(gpt).parameters()
    )
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
        report_every=max(1, args.sync_every // 4),
        timeout_s=30.0,
    )
    phases: list[_Phase] = []
    try:
        specs = [
            PeerSpec(
                index=i,
                outer=outer,
                outer_steps=num_outer,
                die_at_inner_step=(args.steps // 2 if kill and i == args.peers - 1 else None),
                min_final_world=args.peers if kill else 0,
                max_outer_steps=20 * num_outer,  # room for the rejoiner to arrive on a busy box
                evaluate_at_end=(i == 0),
                **base,
            )
            for i in range(args.peers)
        ]
        diloco = _run_phase(
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
                _run_phase(
                    "data-parallel", dp_specs, total_steps=None, kill_index=None, timeout_s=900
                )
            )
    finally:
        master.stop()
    print("\n== summary")
    for phase in phases:
        r0 = phase.results[0]
        steps = r0["inner_steps"]
        util = 1.0 - r0["comm_wait_s"] / r0["wall_s"] if r0["wall_s"] else 0.0
        print(
            f"{phase.name:>14}: {steps} steps in {r0['wall_s']:.0f} s, validation loss "
            f"{r0['val_loss']:.3f}, sent {_fmt_bytes(r0['tx_bytes'])} per peer, "
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
