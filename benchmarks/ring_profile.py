"""Where a ring all-reduce's time goes: the internal ring, protected and plain, against Gloo.

Starts the peers itself (multiprocessing, spawn). Every peer builds a protected ring (the default,
AES-256-GCM), a plain one (``encryption=False``) and a Gloo group, and times them interleaved rep by
rep on the same tensor, so the ratios are taken under the same load; "serial" is a protected ring
with ``overlap_cipher=False`` (records sealed and opened on the ring's own threads, in turn with
the socket calls, instead of on the helper threads). For each variant it reports
the bus bandwidth (best of the reps, each rep timed by its slowest peer) and the CPU a peer spends
per op, split into user and kernel time (on loopback the kernel time is the socket copies), so a
change can be judged by the CPU it costs as well as by the wall clock.

    .venv/bin/python benchmarks/ring_profile.py                 # 64 MB, 2 and 4 peers
    .venv/bin/python benchmarks/ring_profile.py --quick         # 16 MB, fewer reps
    .venv/bin/python benchmarks/ring_profile.py --peers 4 --mib 100 --reps 8 --subchunk-mib 1

Last line: one JSON object with the claims ``protected_vs_plain_loopback_2peers`` (issue 12,
>= 0.8) and ``ring_busbw_vs_gloo_4peers`` (issue 14's internal ring, >= 1.05), both measured here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from lowcomm.comm import PeerListener, connect_ring

TOKEN = b"benchmark-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, n: int, cfg: dict[str, Any], addr_q: Any, pipe: Any) -> None:
    torch.set_num_threads(1)
    listeners = {
        "protected": PeerListener("127.0.0.1", 0, token=TOKEN),
        "plain": PeerListener("127.0.0.1", 0, token=TOKEN, encryption=False),
        "serial": PeerListener("127.0.0.1", 0, token=TOKEN),
    }
    addr_q.put((rank, {k: v.address for k, v in listeners.items()}))
    addresses = pipe.recv()
    rings = {
        name: connect_ring(
            listener=listener,
            rank=rank,
            addresses=[a[name] for a in addresses],
            ring_id=f"profile-{name}-{n}",
            token=TOKEN,
            num_connections=cfg["num_connections"],
            timeout_s=60,
            subchunk_bytes=cfg["subchunk_bytes"],
            thread_per_connection=False,
            encryption=name != "plain",
            overlap_cipher=name != "serial",
        )
        for name, listener in listeners.items()
    }
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{cfg['gloo_port']}", rank=rank, world_size=n
    )
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(cfg["numel"], generator=gen)
    out = torch.empty_like(x)
    work = x.clone()
    variants = cfg["variants"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    user: dict[str, float] = dict.fromkeys(variants, 0.0)
    kernel: dict[str, float] = dict.fromkeys(variants, 0.0)
    if cfg.get("pid_file"):
        # For a profiler to attach to the timed loop only (see --pid-file).
        with open(cfg["pid_file"], "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(3)
        dist.barrier()
    for rep in range(cfg["warmup"] + cfg["reps"]):
        order = variants if rep % 2 == 0 else variants[::-1]
        for v in order:
            dist.barrier()
            c0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            if v == "gloo":
                dist.all_reduce(work)
            else:
                rings[v].all_reduce(x, "sum", out=out, timeout_s=120)
            elapsed = time.perf_counter() - t0
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            if rep >= cfg["warmup"]:
                times[v].append(elapsed)
                user[v] += c1.ru_utime - c0.ru_utime
                kernel[v] += c1.ru_stime - c0.ru_stime
    if cfg.get("pid_file"):
        with open(cfg["pid_file"], "a") as f:
            f.write(f"{os.getpid()} done\n")
        time.sleep(1)
    # Every peer's result must match Gloo's (sums of the same inputs, fp32; the ring's order of
    # additions differs from Gloo's, so compare within a rounding tolerance).
    expect = x.clone()
    dist.all_reduce(expect)
    rings["protected"].all_reduce(x, "sum", out=out, timeout_s=120)
    ok = bool(torch.allclose(out, expect, rtol=1e-5, atol=1e-4))
    reps = cfg["reps"]
    pipe.send(
        {
            "times": times,
            "user_s": {v: u / reps for v, u in user.items()},
            "kernel_s": {v: k / reps for v, k in kernel.items()},
            "ok": ok,
        }
    )
    dist.barrier()
    for ring in rings.values():
        ring.close()
    for listener in listeners.values():
        listener.close()
    dist.destroy_process_group()


def run_group(n: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    cfg = dict(cfg, gloo_port=_free_port())
    addr_q = ctx.Queue()
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [
        ctx.Process(target=_worker, args=(r, n, cfg, addr_q, pipes[r][1]), daemon=True)
        for r in range(n)
    ]
    for p in procs:
        p.start()
    addresses: list[Any] = [None] * n
    for _ in range(n):
        rank, address = addr_q.get(timeout=120)
        addresses[rank] = address
    for parent, _ in pipes:
        parent.send(addresses)
    results = []
    for parent, _ in pipes:
        if not parent.poll(600):
            raise RuntimeError("a profile peer did not report within 600 s")
        results.append(parent.recv())
    for p in procs:
        p.join(timeout=60)
    return results


def busbw(n: int, nbytes: int, results: list[dict[str, Any]], variant: str) -> float:
    """Best-of-reps bus bandwidth in GB/s, each rep timed by its slowest peer."""
    reps = zip(*(r["times"][variant] for r in results), strict=True)
    best = min(max(rep) for rep in reps)
    return 2 * (n - 1) / n * nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MB, 3 reps (< 1 min)")
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--mib", type=float, default=None, help="tensor size in MiB of fp32")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--num-connections", type=int, default=1)
    parser.add_argument("--subchunk-mib", type=float, default=4.0)
    parser.add_argument(
        "--only",
        choices=["gloo", "protected", "plain", "serial"],
        default=None,
        help="time one variant alone (for a profiler); no ratios, no claims",
    )
    parser.add_argument(
        "--pid-file",
        default=None,
        help="each peer appends its pid here and waits 3 s before the timed loop, "
        "then a line '<pid> done' after it (attach a profiler: perf record -p ...)",
    )
    args = parser.parse_args()
    mib = args.mib if args.mib is not None else (16.0 if args.quick else 64.0)
    numel = int(mib * 1024 * 1024) // 4
    nbytes = numel * 4
    cfg = {
        "numel": numel,
        "num_connections": args.num_connections,
        "subchunk_bytes": int(args.subchunk_mib * 1024 * 1024),
        "warmup": 1,
        "reps": args.reps if args.reps is not None else (3 if args.quick else 6),
        "pid_file": args.pid_file,
        "variants": [args.only] if args.only else ["gloo", "protected", "plain", "serial"],
    }
    print(
        f"ring all-reduce of {nbytes / 1e6:.0f} MB fp32 on loopback, {os.cpu_count()} CPUs, "
        f"{args.num_connections} connection(s), {args.subchunk_mib:g} MiB sub-chunks, "
        f"{cfg['reps']} reps"
    )
    print(
        f"{'peers':>5} {'variant':<10} {'busbw GB/s':>10} {'vs Gloo':>8} "
        f"{'user ms/op':>10} {'kernel ms/op':>12}"
    )
    claims: list[dict[str, Any]] = []
    for n in args.peers:
        results = run_group(n, cfg)
        bw = {v: busbw(n, nbytes, results, v) for v in cfg["variants"]}
        gloo = bw.get("gloo", float("nan"))
        for v, b in bw.items():
            u = sum(r["user_s"][v] for r in results) / n * 1e3
            k = sum(r["kernel_s"][v] for r in results) / n * 1e3
            print(f"{n:>5} {v:<10} {b:>10.2f} {b / gloo:>7.2f}x {u:>10.1f} {k:>12.1f}")
        ok = all(r["ok"] for r in results)
        print(f"{n:>5} results match Gloo's: {ok}")
        if args.only:
            continue
        if n == 2:
            value = round(bw["protected"] / bw["plain"], 3)
            claims.append(
                {
                    "name": "protected_vs_plain_loopback_2peers",
                    "value": value,
                    "goal": 0.8,
                    "ok": ok and value >= 0.8,
                }
            )
        if n == 4:
            value = round(bw["protected"] / gloo, 3)
            claims.append(
                {
                    "name": "ring_busbw_vs_gloo_4peers",
                    "value": value,
                    "goal": 1.05,
                    "ok": ok and value >= 1.05,
                }
            )
    print(json.dumps({"benchmark": "ring_profile", "claims": claims}))


if __name__ == "__main__":
    main()
