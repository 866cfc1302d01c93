"""What ``lowcomm demo`` and ``lowcomm run`` share: their flags, and one phase of local peers.

A phase starts one process per ``PeerSpec`` on this machine, gathers the peers' events (progress,
results, errors), prints a progress line, and, when asked, restarts a peer that a fault killed as
a joiner (the demo's rejoin). Top-level imports stay light: ``lowcomm --help`` loads no torch.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowcomm.diloco import OuterConfig
    from lowcomm.launch.peer import PeerSpec
    from lowcomm.launch.tinygpt import GPTConfig

__all__ = [
    "Phase",
    "add_arguments",
    "format_bytes",
    "gpt_config",
    "outer_config",
    "peer_context",
    "run_phase",
]

# lowcomm.diloco.METHODS, spelled out: importing lowcomm.diloco would load torch for --help.
_METHODS = ("diloco", "async", "streaming", "co2", "delayed_nesterov")


def add_arguments(
    parser: argparse.ArgumentParser,
    *,
    peers: int,
    steps: int,
    method: str,
    bandwidth_mbps: float,
    latency_ms: float,
) -> None:
    """Adds the flags both commands take; the defaults that differ between them are arguments."""
    parser.add_argument(
        "--peers", type=int, default=peers, help=f"number of local peers (default {peers})"
    )
    parser.add_argument(
        "--steps", type=int, default=steps, help=f"inner steps per peer (default {steps})"
    )
    parser.add_argument(
        "--sync-every", type=int, default=20, help="inner steps per outer step (20)"
    )
    parser.add_argument(
        "--method", default=method, choices=_METHODS, help=f"outer loop (default {method})"
    )
    parser.add_argument("--quantization", default="uint8", help="pseudo-gradient codec (uint8)")
    parser.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=bandwidth_mbps,
        help=f"emulated link, Mbit/s per peer ({bandwidth_mbps:g})",
    )
    parser.add_argument(
        "--latency-ms", type=float, default=latency_ms, help=f"one-way latency ({latency_ms:g} ms)"
    )
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (2)")
    parser.add_argument("--width", type=int, default=128, help="model width (128: 0.47M params)")
    parser.add_argument("--context", type=int, default=64, help="context length in bytes (64)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per peer step (16)")
    parser.add_argument("--seed", type=int, default=0)


def gpt_config(args: argparse.Namespace) -> GPTConfig:
    """The tiny GPT's ``GPTConfig`` from the flags (one head per 32 channels)."""
    from lowcomm.launch.tinygpt import GPTConfig

    return GPTConfig(
        num_layers=args.layers,
        width=args.width,
        num_heads=max(1, args.width // 32),
        context=args.context,
    )


def outer_config(args: argparse.Namespace, **overrides: Any) -> OuterConfig:
    """The ``OuterConfig`` from the flags (two fragments when ``--sync-every`` is even).

    Raises:
        ValueError: a setting ``OuterConfig`` rejects (its message names the field).
    """
    from lowcomm.diloco import OuterConfig

    return OuterConfig(
        method=args.method,
        sync_every=args.sync_every,
        quantization=args.quantization,
        num_fragments=2 if args.sync_every % 2 == 0 else 1,
        **overrides,
    )


@dataclass
class Phase:
    """What one phase produced: peer 0's curve, every peer's result, and notable events."""

    name: str
    curve: list[tuple[float, float, float]] = field(default_factory=list)  # (s, bytes, loss)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (peer 0's s, what happened)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def peer_context() -> Any:
    """The multiprocessing context peers start in."""
    # A forkserver with torch and lowcomm preloaded starts a peer in well under a second, so a
    # rejoining peer arrives while the others still train.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lowcomm.launch.peer"])
    return ctx


def run_phase(
    name: str,
    specs: list[PeerSpec],
    *,
    total_steps: int | None,
    kill_index: int | None,
    timeout_s: float,
) -> Phase:
    """Runs one process per spec until every peer reports its result.

    If ``kill_index`` is set, that peer is expected to die of its injected fault; a new process
    then rejoins in its place. Raises ``SystemExit`` with the reason if a peer fails, exits
    otherwise, or the phase runs past ``timeout_s``.
    """
    from lowcomm.faults import KILLED_EXIT_CODE
    from lowcomm.launch.peer import run_peer

    ctx = peer_context()
    events: Any = ctx.Queue()
    procs = {s.index: ctx.Process(target=run_peer, args=(s, events), daemon=True) for s in specs}
    by_index = {s.index: s for s in specs}
    phase = Phase(name)
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
            if kind == "resumed":
                msg = f"peer {index} resumed from its own checkpoint at inner step {payload['inner_step']}"
                phase.events.append(msg)
                phase.marks.append((_elapsed(latest), f"peer {index} resumed"))
                print(("\n" if tty else "") + f"!! {msg}", flush=True)
            if kind == "fresh":
                msg = (
                    f"peer {index} had no durable checkpoint yet when it was killed: it rejoined as "
                    "a fresh peer and took the run's current state"
                )
                phase.events.append(msg)
                phase.marks.append((_elapsed(latest), f"peer {index} rejoined"))
                print(("\n" if tty else "") + f"!! {msg}", flush=True)
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
                if not proc.is_alive() and proc.exitcode == KILLED_EXIT_CODE:
                    step = by_index[kill_index].kill_step()
                    how = (
                        "it restarts from its own checkpoint"
                        if by_index[kill_index].checkpoint_dir
                        else "a new process rejoins in its place"
                    )
                    msg = (
                        f"peer {kill_index} killed at inner step {step}; the others carry on, {how}"
                    )
                    phase.events.append(msg)
                    phase.marks.append((_elapsed(latest), f"peer {kill_index} killed"))
                    print(("\n" if tty else "") + f"!! {msg}", flush=True)
                    spec = replace(by_index[kill_index], joining=True, faults=())
                    procs[kill_index] = ctx.Process(
                        target=run_peer, args=(spec, events), daemon=True
                    )
                    procs[kill_index].start()
                    restarted = True
            for i, proc in procs.items():
                if (
                    not proc.is_alive()
                    and proc.exitcode not in (0, KILLED_EXIT_CODE, None)
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


def _elapsed(latest: dict[int, dict[str, Any]]) -> float:
    """Peer 0's training seconds at its latest report (the curve's clock)."""
    return float(latest.get(0, {}).get("elapsed_s", 0.0))


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
        f"sent {format_bytes(payload['tx_bytes'])}/peer | peers {payload['world_size']}"
    )
    print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
