"""All-reduce: the public ``Communicator`` against torch.distributed Gloo (and PCCL where it loads).

What a user calls is measured: a ``Master`` (in this process) and, in every peer process, a
``Communicator`` with default settings calling ``all_reduce(tensor, "sum")`` in place, and with
``out=``; fp32 and uint8 (``quantization="uint8"``); protection on (the default: every frame sealed
with AES-256-GCM) and off (a second master and communicator with ``encryption=False``). In the same
processes and interleaved rep by rep it times Gloo's ``dist.all_reduce`` on the same tensor and,
for reference, the internal ring (``connect_ring`` + ``Ring.all_reduce(out=)``), so every ratio is
taken under the same load. Bus bandwidth = 2 (n - 1) / n * bytes / seconds, best of the reps;
each rep's time is the slowest peer's. A 4 KiB all-reduce's latency is the median over many reps
(with the master round trips the call made, from ``AllReduceInfo``). The shaped rows limit every
peer's uplink to 1 Gbit/s (``CommConfig(shaper=...)``). Where ``pypccl`` imports, PCCL runs in its
own peer processes beside the public call and Gloo, every peer bounded by a timeout (it hung once):
a hung PCCL is reported as such, never waited for.

    .venv/bin/python benchmarks/allreduce.py            # 100 MB fp32, 2 and 4 peers
    .venv/bin/python benchmarks/allreduce.py --quick    # smaller and fewer reps, same code paths
    .venv/bin/python benchmarks/allreduce.py --latency  # only the 4 KiB latency rows
    .venv/bin/python benchmarks/allreduce.py --protected-only  # issue 12's 2-peer rows alone

Last line: one JSON object with the claims (issues 4, 12 and 14). ``*_16core`` claims are made
only on a host with at least 16 CPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from lowcomm.comm import CommConfig, Communicator, Master, PeerListener, connect_ring
from lowcomm.comm.shaper import Shaper

TOKEN = b"benchmark-token-0123456789abcdef"
SMALL_NUMEL = 1024  # 4 KiB of fp32

# What each variant is (the row's label); "api*" are the public call.
LABELS = {
    "gloo": "Gloo dist.all_reduce (in place)",
    "api": "public call, in place (protected)",
    "api_out": "public call, out= (protected)",
    "api_uint8": "public call uint8, in place (protected)",
    "api_auto": "public call quantization='auto', in place (protected)",
    "api_plain": "public call, in place (plain)",
    "ring": "internal ring, out= (protected; reference)",
    "ring_plain": "internal ring, out= (plain; reference)",
    "ring_uint8": "internal ring uint8, out= (protected; reference)",
    "pccl": "PCCL all_reduce (in place)",
    "pccl_uint8": "PCCL uint8 all_reduce (in place)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(comm: Any, n: int, timeout_s: float) -> None:
    """Connects and takes part in ``update_topology`` until all ``n`` peers are accepted (every
    accepted peer calls it, so they all leave the loop at the same phase)."""
    comm.connect(timeout_s=timeout_s)
    while comm.world_size < n:
        comm.update_topology(timeout_s=timeout_s)


def _api_config(cfg: dict[str, Any], shaper: Shaper | None, *, encryption: bool) -> CommConfig:
    # Default settings: only what the benchmark must set (the shaper, the encryption choice of
    # its master, a timeout that covers a loaded 2-core machine).
    kw: dict[str, Any] = {"timeout_s": 300.0, "shaper": shaper, "encryption": encryption}
    if cfg.get("api_num_connections"):
        kw["num_connections"] = cfg["api_num_connections"]
    return CommConfig(**kw)


def _worker(rank: int, n: int, cfg: dict[str, Any], conn: Any) -> None:
    try:
        _run_worker(rank, n, cfg, conn)
    except BaseException:
        conn.send({"error": traceback.format_exc()})


def _run_worker(rank: int, n: int, cfg: dict[str, Any], conn: Any) -> None:
    torch.set_num_threads(1)
    variants: list[str] = list(cfg["variants"])
    shaper = (
        Shaper(bandwidth_bps=cfg["bandwidth_bps"], latency_ms=cfg.get("latency_ms", 0.0))
        if cfg.get("bandwidth_bps")
        else None
    )
    # The internal ring (reference rows): its own listeners, addresses exchanged via the parent.
    listeners: dict[bool, PeerListener] = {}
    for enc, v in ((True, "ring"), (False, "ring_plain")):
        if v in variants or (enc and "ring_uint8" in variants):
            listeners[enc] = PeerListener(
                "127.0.0.1", 0, token=TOKEN, shaper=shaper, encryption=enc
            )
    conn.send({e: lst.address for e, lst in listeners.items()})
    addresses: dict[bool, list[Any]] = conn.recv()
    rings = {
        enc: connect_ring(
            listener=lst,
            rank=rank,
            addresses=addresses[enc],
            ring_id=f"bench-{n}-{enc}",
            token=TOKEN,
            num_connections=cfg["num_connections"],
            timeout_s=60,
            shaper=shaper,
            subchunk_bytes=cfg["subchunk_bytes"],
            thread_per_connection=cfg["thread_per_connection"],
            encryption=enc,
        )
        for enc, lst in listeners.items()
    }
    comms: dict[str, Any] = {}
    if cfg.get("master"):
        comms["api"] = Communicator(
            cfg["master"], token=TOKEN, config=_api_config(cfg, shaper, encryption=True)
        )
        _join(comms["api"], n, 120)
    if cfg.get("plain_master"):
        comms["plain"] = Communicator(
            cfg["plain_master"], token=TOKEN, config=_api_config(cfg, shaper, encryption=False)
        )
        _join(comms["plain"], n, 120)
    if cfg.get("pccl_master"):
        from lowcomm.comm import open_communicator

        comms["pccl"] = open_communicator(
            cfg["pccl_master"], backend="pccl", config=CommConfig(timeout_s=cfg["pccl_op_s"])
        )
        _join(comms["pccl"], n, 60)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{cfg['gloo_port']}", rank=rank, world_size=n
    )
    from lowcomm.compression import get_codec

    codec = get_codec("uint8")
    results: dict[str, Any] = {}

    def timed(
        numel: int, names: list[str], reps: int, warmup: int, key: str = ""
    ) -> dict[str, list[float]]:
        gen = torch.Generator().manual_seed(1234 + rank)
        x = torch.randn(numel, generator=gen)
        out = torch.empty_like(x)
        work = x.clone()
        times: dict[str, list[float]] = {v: [] for v in names}
        trips: dict[str, list[int]] = {v: [] for v in names}
        cpu: dict[str, list[float]] = {v: [] for v in names}
        codecs: dict[str, set[str]] = {v: set() for v in names}
        for rep in range(warmup + reps):
            # Alternate the order so that neither system always runs right after the other.
            for v in names if rep % 2 == 0 else names[::-1]:
                work.copy_(x)  # in-place variants start from the same values every rep
                dist.barrier()
                c0 = time.process_time()
                t0 = time.perf_counter()
                info = _call(v, comms, rings, codec, x, work, out)
                dt = time.perf_counter() - t0
                if rep >= warmup:
                    times[v].append(dt)
                    cpu[v].append(time.process_time() - c0)
                    codecs[v].add(str(getattr(info, "codec", None)))
                    rt = getattr(info, "master_round_trips", None)
                    if rt is not None:
                        trips[v].append(int(rt))
        results[key + "round_trips"] = {v: t for v, t in trips.items() if t}
        results[key + "cpu"] = cpu
        results[key + "codecs"] = {v: sorted(c) for v, c in codecs.items()}
        return times

    results["times"] = timed(cfg["numel"], variants, cfg["reps"], cfg["warmup"])
    small: list[str] = (
        [v for v in ("gloo", "api") if v in variants] if cfg.get("small_reps") else []
    )
    if small:
        results["small"] = timed(SMALL_NUMEL, small, cfg["small_reps"], 5, key="small_")
    if cfg.get("rmse"):
        # Quantized all-reduce of Gaussian inputs against the exact fp64 result of the same inputs,
        # for the average (the scale of PCCL's published 0.0268 / 0.0087) and for the sum.
        g = torch.Generator().manual_seed(99 + rank)
        y = torch.randn(cfg["rmse_numel"], generator=g)
        exact = y.double().clone()
        dist.all_reduce(exact)
        for op, ref in (("avg", exact / n), ("sum", exact)):
            qout = torch.empty_like(y)
            comms["api"].all_reduce(y, op, out=qout, quantization="uint8")
            err = qout.double() - ref
            results[f"rmse_{op}"] = float(err.pow(2).mean().sqrt())
            results[f"bias_{op}"] = float(err.mean())
            results[f"qhash_{op}"] = hashlib.sha256(qout.numpy().tobytes()).hexdigest()
    dist.barrier()
    # Results first: a close that hangs (PCCL's did) must not lose them; the parent kills us.
    conn.send(results)
    for ring in rings.values():
        ring.close()
    for lst in listeners.values():
        lst.close()
    for c in comms.values():
        c.close()
    dist.destroy_process_group()


def _call(
    v: str,
    comms: dict[str, Any],
    rings: dict[bool, Any],
    codec: Any,
    x: torch.Tensor,
    work: torch.Tensor,
    out: torch.Tensor,
) -> Any:
    if v == "gloo":
        return dist.all_reduce(work)
    if v == "api":
        return comms["api"].all_reduce(work, "sum")
    if v == "api_out":
        return comms["api"].all_reduce(x, "sum", out=out)
    if v == "api_uint8":
        return comms["api"].all_reduce(work, "sum", quantization="uint8")
    if v == "api_auto":
        return comms["api"].all_reduce(work, "sum", quantization="auto")
    if v == "api_plain":
        return comms["plain"].all_reduce(work, "sum")
    if v == "ring":
        return rings[True].all_reduce(x, "sum", out=out, timeout_s=300)
    if v == "ring_plain":
        return rings[False].all_reduce(x, "sum", out=out, timeout_s=300)
    if v == "ring_uint8":
        return rings[True].all_reduce(x, "sum", out=out, codec=codec, timeout_s=300)
    if v == "pccl":
        return comms["pccl"].all_reduce(work, "sum")
    if v == "pccl_uint8":
        return comms["pccl"].all_reduce(work, "sum", quantization="uint8")
    raise ValueError(v)


def _pccl_master(port: int, ready: Any) -> None:
    from lowcomm.comm.pccl import PcclMaster

    PcclMaster(("127.0.0.1", port)).start()
    ready.set()
    time.sleep(3600)  # killed by the parent


def run_group(n: int, cfg: dict[str, Any], *, bound_s: float = 900.0) -> list[dict[str, Any]]:
    """Starts ``n`` peers (and the masters the variants need), runs the configured timings,
    returns each peer's results. A group that does not report within ``bound_s`` is killed and
    raises ``TimeoutError``; a peer's exception is raised here with its traceback."""
    ctx = mp.get_context("spawn")
    variants = set(cfg["variants"])
    masters = []
    cfg = dict(cfg, gloo_port=_free_port())
    for key, enc, needed in (
        ("master", True, {"api", "api_out", "api_uint8", "api_auto"} & variants or cfg.get("rmse")),
        ("plain_master", False, "api_plain" in variants),
    ):
        if needed:
            m = Master(("127.0.0.1", 0), token=TOKEN, first_peer_grace_s=0.1, encryption=enc)
            masters.append(m.start())
            cfg[key] = f"{m.address[0]}:{m.address[1]}"
    helpers: list[Any] = []
    procs: list[Any] = []
    try:
        if variants & {"pccl", "pccl_uint8"}:
            port = _free_port()
            ready = ctx.Event()
            pm = ctx.Process(target=_pccl_master, args=(port, ready), daemon=True)
            pm.start()
            helpers.append(pm)
            end = time.monotonic() + 60
            while not ready.wait(0.2):
                if not pm.is_alive() or time.monotonic() > end:
                    raise RuntimeError("the PCCL master did not start (or died at once)")
            cfg["pccl_master"] = f"127.0.0.1:{port}"
        pipes = [ctx.Pipe() for _ in range(n)]
        procs = [
            ctx.Process(target=_worker, args=(r, n, cfg, pipes[r][1]), daemon=True)
            for r in range(n)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + bound_s
        addrs = [_recv(parent, deadline) for parent, _ in pipes]
        ring_addresses = {e: [a[e] for a in addrs] for e in addrs[0]}
        for parent, _ in pipes:
            parent.send(ring_addresses)
        results = [_recv(parent, deadline) for parent, _ in pipes]
        end = time.monotonic() + 20  # closing; the finally kills a peer that hangs in it
        for p in procs:
            p.join(timeout=max(0.1, end - time.monotonic()))
        return results
    finally:
        for p in procs + helpers:
            if p.is_alive():
                p.kill()
        for m in masters:
            m.stop()


def _recv(pipe: Any, deadline: float) -> Any:
    if not pipe.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError("a benchmark peer did not report in time")
    msg = pipe.recv()
    if isinstance(msg, dict) and "error" in msg:
        raise RuntimeError(f"a benchmark peer failed:\n{msg['error']}")
    return msg


def best(results: list[dict[str, Any]], variant: str, key: str = "times") -> float:
    """Best-of-reps seconds, each rep timed by its slowest peer."""
    reps = zip(*(r[key][variant] for r in results), strict=True)
    return min(max(rep) for rep in reps)


def median(results: list[dict[str, Any]], variant: str, key: str = "times") -> float:
    reps = zip(*(r[key][variant] for r in results), strict=True)
    return statistics.median(max(rep) for rep in reps)


def cpu_ms(results: list[dict[str, Any]], variant: str) -> float:
    """CPU milliseconds per op of one peer process (all its threads), median over reps and
    averaged over the peers: on a loaded host a steadier measure of the work than the clock."""
    return 1e3 * statistics.mean(statistics.median(r["cpu"][variant]) for r in results)


def busbw(n: int, nbytes: int, results: list[dict[str, Any]], variant: str) -> float:
    """Best-of-reps bus bandwidth in GB/s."""
    return 2 * (n - 1) / n * nbytes / best(results, variant) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer reps (< 1 min)")
    # The internal ring's settings (its reference rows only; the public call uses its defaults).
    # Loopback has no long, fat link to fill: one connection per neighbour and one sending and one
    # receiving thread per peer were the fastest here.
    parser.add_argument("--num-connections", type=int, default=1)
    parser.add_argument("--subchunk-mib", type=float, default=4.0)
    parser.add_argument("--thread-per-connection", action="store_true")
    parser.add_argument(
        "--api-num-connections",
        type=int,
        default=0,
        help="override CommConfig.num_connections of the public call (default: its default)",
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="only the 4 KiB latency rows (public call and Gloo, 2 and 4 peers, interleaved)",
    )
    parser.add_argument("--small-reps", type=int, default=0, help="4 KiB reps (0: the default)")
    parser.add_argument("--no-pccl", action="store_true", help="skip PCCL even where it loads")
    parser.add_argument(
        "--protected-only",
        action="store_true",
        help="only the 2-peer protected and plain rows (issue 12 on loopback), with --reps reps",
    )
    parser.add_argument("--reps", type=int, default=0, help="override the number of reps")
    parser.add_argument("--pccl-bound-s", type=float, default=240.0, help="bound per PCCL group")
    args = parser.parse_args()
    quick = args.quick
    numel = 4_000_000 if quick else 25_000_000  # 16 MB or 100 MB of fp32
    nbytes = numel * 4
    cpus = os.cpu_count() or 1
    base = {
        "numel": numel,
        "num_connections": args.num_connections,
        "subchunk_bytes": int(args.subchunk_mib * 1024 * 1024),
        "thread_per_connection": args.thread_per_connection,
        "api_num_connections": args.api_num_connections,
        "warmup": 1,
        "reps": args.reps or (3 if quick else 8),
    }
    rows: list[tuple[str, str]] = []
    claims: list[dict[str, Any]] = []

    def claim(
        name: str, value: float | None, goal: float, *, lower_is_better: bool = False, **extra: Any
    ) -> None:
        ok = value is not None and (value <= goal if lower_is_better else value >= goal)
        v = None if value is None else round(value, 3)
        claims.append({"name": name, "value": v, "goal": goal, "ok": ok, **extra})

    print(
        f"all-reduce of {nbytes / 1e6:.0f} MB fp32 on loopback, {cpus} CPUs; public call with "
        f"CommConfig defaults; internal ring: {args.num_connections} connection(s) per "
        f"neighbour, {args.subchunk_mib:g} MiB sub-chunks"
    )
    small_reps = args.small_reps or (20 if quick else 200)
    if args.latency:
        for n in (2, 4):
            cfg = dict(base, variants=["gloo", "api"], reps=0, warmup=0, small_reps=small_reps)
            _latency_rows(n, run_group(n, cfg), rows, claim)
        _print(rows, claims)
        return
    if args.protected_only:
        _protected_only(base, nbytes)
        return
    api_vs_gloo: dict[int, float] = {}
    for n in (2, 4):
        variants = ["gloo", "api", "api_out", "api_uint8", "api_auto", "ring", "ring_uint8"]
        if n == 2:
            variants += ["api_plain", "ring_plain"]
        cfg = dict(base, variants=variants, small_reps=small_reps)
        results = run_group(n, cfg)
        bw = {v: busbw(n, nbytes, results, v) for v in variants}
        for v in variants:
            used = results[0]["codecs"].get(v, [])
            tail = f"; codec {'/'.join(used)}" if v == "api_auto" else ""
            rows.append(
                (
                    f"{n} peers  {LABELS[v]}",
                    f"{bw[v]:.2f} GB/s  ({bw[v] / bw['gloo']:.2f}x Gloo; "
                    f"{cpu_ms(results, v):.1f} CPU-ms/op{tail})",
                )
            )
        api_vs_gloo[n] = bw["api"] / bw["gloo"]
        claim(f"api_busbw_vs_gloo_{n}peers", api_vs_gloo[n], 1.3 if n == 2 else 1.05)
        claim(
            f"busbw_vs_gloo_{n}peers",
            bw["ring"] / bw["gloo"],
            1.3 if n == 2 else 1.05,
            what="internal ring, out=",
        )
        rows.append((f"{n} peers  public out= vs in place", f"{bw['api_out'] / bw['api']:.2f}x"))
        rows.append((f"{n} peers  public call vs internal ring", f"{bw['api'] / bw['ring']:.2f}x"))
        u = bw["api_uint8"] / bw["api"]
        rows.append((f"{n} peers  public uint8 vs fp32 (fp32-equiv busbw)", f"{u:.2f}x"))
        if n == 2:
            claim("api_uint8_vs_fp32_loopback", u, 1.0)
            p = bw["api"] / bw["api_plain"]
            rows.append((f"{n} peers  public protected vs plain", f"{p:.2f}x"))
            claim("protected_vs_plain_loopback_2peers", p, 0.8, what="public call, in place")
            rows.append(
                (f"{n} peers  ring protected vs plain", f"{bw['ring'] / bw['ring_plain']:.2f}x")
            )
        _latency_rows(n, results, rows, claim)
    if cpus >= 16:
        claim("api_busbw_vs_gloo_4peers_16core", api_vs_gloo[4], 1.3)

    # PCCL, where it loads: its own processes, the public call and Gloo interleaved with it.
    pccl_reason = "--no-pccl" if args.no_pccl else _pccl_unavailable()
    pccl_vs: float | None = None
    for n in (2, 4):
        if pccl_reason is not None:
            rows.append((f"{n} peers  PCCL", f"skipped: {pccl_reason}"))
            continue
        variants = ["gloo", "api", "pccl", "pccl_uint8"]
        cfg = dict(base, variants=variants, pccl_op_s=min(120.0, args.pccl_bound_s / 2))
        try:
            results = run_group(n, cfg, bound_s=args.pccl_bound_s)
        except (TimeoutError, RuntimeError) as e:
            rows.append((f"{n} peers  PCCL", f"failed or hung, killed: {str(e).splitlines()[0]}"))
            continue
        bw = {v: busbw(n, nbytes, results, v) for v in variants}
        for v in variants:
            rows.append(
                (
                    f"{n} peers  [PCCL group] {LABELS[v]}",
                    f"{bw[v]:.2f} GB/s  ({bw[v] / bw['gloo']:.2f}x Gloo)",
                )
            )
        rows.append((f"{n} peers  public call vs PCCL", f"{bw['api'] / bw['pccl']:.2f}x"))
        if n == 4:
            pccl_vs = bw["api"] / bw["pccl"]
    if cpus >= 16:
        claim("api_busbw_vs_pccl_4peers_16core", pccl_vs, 2.0)

    # Quantization error: 3 peers, Gaussian inputs, through the public call.
    cfg = dict(base, variants=[], rmse=True, rmse_numel=1_000_000 if quick else 4_000_000)
    results = run_group(3, cfg)
    identical = all(len({r[f"qhash_{op}"] for r in results}) == 1 for op in ("avg", "sum"))
    for op in ("avg", "sum"):
        rows.append(
            (
                f"3 peers  uint8 {op} RMSE vs exact",
                f"{results[0][f'rmse_{op}']:.5f} (bias {results[0][f'bias_{op}']:+.1e})",
            )
        )
    rows.append(("3 peers  uint8 results bit-identical", str(identical)))
    claim("uint8_rmse_3peers", results[0]["rmse_avg"], 0.009, lower_is_better=True)
    claims[-1]["value"] = round(results[0]["rmse_avg"], 5)
    claims[-1]["ok"] = claims[-1]["ok"] and identical
    claims[-1].update(op="avg", rmse_sum=round(results[0]["rmse_sum"], 5))

    # Shaped: every peer's uplink at 1 Gbit/s.
    rate_bps = 1e9
    shaped_numel = 2_000_000 if quick else 6_250_000  # 8 MB or 25 MB
    n = 2
    cfg = dict(
        base,
        numel=shaped_numel,
        bandwidth_bps=rate_bps,
        variants=["api", "api_plain", "api_uint8", "api_auto", "ring"],
        reps=2 if quick else 6,
    )
    results = run_group(n, cfg)
    shaped_bytes = shaped_numel * 4
    bw = {v: busbw(n, shaped_bytes, results, v) for v in cfg["variants"]}
    link = rate_bps / 8 / 1e9
    for v in cfg["variants"]:
        used = results[0]["codecs"].get(v, [])
        tail = f"; codec {'/'.join(used)}" if v == "api_auto" else ""
        rows.append(
            (
                f"{n} peers @1 Gbit/s  {LABELS[v]}",
                f"{bw[v]:.3f} GB/s = {bw[v] / link:.1%} of the link{tail}",
            )
        )
    claim("link_utilisation_1gbit", bw["api"] / link, 0.9, what="public call, in place")
    claim("protected_vs_plain_shaped_1gbit", bw["api"] / bw["api_plain"], 0.97)
    claim("api_uint8_vs_fp32_shaped", bw["api_uint8"] / bw["api"], 3.5)

    _print(rows, claims)


def _latency_rows(
    n: int, results: list[dict[str, Any]], rows: list[tuple[str, str]], claim: Any
) -> None:
    """The 4 KiB rows: median latency of the public call and of Gloo (interleaved), the master
    round trips per op, CPU-ms per op of one peer; the claim at 2 peers."""
    trips = results[0].get("small_round_trips", {})
    g_small, a_small = median(results, "gloo", "small"), median(results, "api", "small")
    rt = trips.get("api")
    rt_txt = f", {max(rt)} master round trips per op" if rt else ""
    cpu = {
        v: 1e3 * statistics.mean(statistics.median(r["small_cpu"][v]) for r in results)
        for v in ("gloo", "api")
    }
    rows.append(
        (
            f"{n} peers  4 KiB latency (median)",
            f"public {a_small * 1e3:.2f} ms, Gloo {g_small * 1e3:.2f} ms "
            f"({a_small / g_small:.2f}x{rt_txt}; CPU-ms/op {cpu['api']:.2f} vs {cpu['gloo']:.2f})",
        )
    )
    if n == 2:
        claim(
            "small_allreduce_latency_vs_gloo",
            a_small / g_small,
            2.0,
            lower_is_better=True,
            master_round_trips=max(rt) if rt else None,
        )


def _print(rows: list[tuple[str, str]], claims: list[dict[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({"benchmark": "allreduce", "claims": claims}))


def _protected_only(base: dict[str, Any], nbytes: int) -> None:
    """``--protected-only``: the public call and the internal ring, protected and plain, at 2
    peers (Gloo beside them for scale); CPU per op too, since on a host whose cores the peers
    fill the ratio follows CPU(plain) / CPU(protected)."""
    variants = ["gloo", "api", "api_plain", "ring", "ring_plain"]
    results = run_group(2, dict(base, variants=variants))
    bw = {v: busbw(2, nbytes, results, v) for v in variants}
    cpu = {v: cpu_ms(results, v) for v in variants}
    rows = [
        (f"2 peers  {LABELS[v]}", f"{bw[v]:.2f} GB/s  ({cpu[v]:.1f} CPU-ms/op)") for v in variants
    ]
    p = bw["api"] / bw["api_plain"]
    rows.append(("2 peers  public protected vs plain", f"{p:.2f}x"))
    rows.append(
        ("2 peers  public CPU/op plain vs protected", f"{cpu['api_plain'] / cpu['api']:.2f}x")
    )
    rows.append(("2 peers  ring protected vs plain", f"{bw['ring'] / bw['ring_plain']:.2f}x"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    claim = {"name": "protected_vs_plain_loopback_2peers", "value": round(p, 3), "goal": 0.8}
    claim.update(ok=p >= 0.8, what="public call, in place")
    print(json.dumps({"benchmark": "allreduce", "claims": [claim]}))


def _pccl_unavailable() -> str | None:
    from lowcomm.comm.pccl import pccl_unavailable_reason

    reason = pccl_unavailable_reason()
    return None if reason is None else reason.split(";")[0]


if __name__ == "__main__":
    main()
