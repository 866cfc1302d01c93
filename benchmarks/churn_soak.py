"""Churn soak: 6 peers on loopback all-reduce in a loop while a peer is killed or added every
few seconds and the master kills itself at random points of the commit protocol (a
``master.commit`` fault: a vote received or a verdict sent) and is restarted on the same address;
every completed all-reduce is checked against the exact sum over its participants.

Each peer ``k`` contributes a one-hot marker at position ``k`` (so the result names exactly who
took part) and a fixed integer-valued payload (so the fp32 sum is exact in any order). A result
is *wrong* if the payload is not the exact sum over the peers the markers name, or the number of
markers is not the participant count the communicator reported.

    .venv/bin/python benchmarks/churn_soak.py           # two minutes
    .venv/bin/python benchmarks/churn_soak.py --quick   # 30 s, same code paths

Reports operations completed, failed-and-retried, master kills, wrong results (must be 0) and the
longest stall
(the longest gap between two completed all-reduces of a peer that lived through it). Last line:
one JSON object, benchmark "churn_soak".
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lowcomm.comm import CommConfig, Communicator, Master
from lowcomm.comm.errors import CommError, CommTimeoutError, PeerFailureError, TopologyError
from lowcomm.faults import KILLED_EXIT_CODE, FaultInjector

TOKEN = b"churn-soak-token-0123456789abcdef"
MAX_PEERS = 256  # marker slots: peer ids are 0..255
PAYLOAD = 20_000
HEARTBEAT_TIMEOUT_S = 2.0
OP_TIMEOUT_S = 10.0


def _master(port: int, message: str | None, index: int, after: int) -> None:
    """The master as a process; with ``message``, it kills itself at that commit message."""
    faults = FaultInjector()
    if message is not None:
        faults.inject(
            "master.commit", kill=True, where={"message": message, "index": index}, after=after
        )
    Master(
        ("127.0.0.1", port), token=TOKEN, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, faults=faults
    ).start()
    threading.Event().wait()


def _keep_master(
    ctx: Any, port: int, rng: random.Random, stop: threading.Event, kills: list[float], every: bool
) -> None:
    """Runs the master, restarting it on the same port whenever its fault killed it."""
    while not stop.is_set():
        if every:
            # A random message, its index among the operation's participants, after a few
            # operations: the kill lands anywhere in the commit protocol.
            fault = (rng.choice(["vote", "verdict"]), rng.randrange(4), rng.randrange(5, 40))
        else:
            fault = (None, 0, 0)
        proc = ctx.Process(target=_master, args=(port, *fault), daemon=True)
        proc.start()
        while proc.is_alive() and not stop.is_set():
            proc.join(0.05)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
            return
        if proc.exitcode == KILLED_EXIT_CODE:
            kills.append(time.time())
            print(f"master killed itself at {fault[0]} #{fault[1]}; restarting", flush=True)


def _contribution(k: int) -> torch.Tensor:
    x = torch.zeros(MAX_PEERS + PAYLOAD)
    x[k] = 1.0
    gen = torch.Generator().manual_seed(1000 + k)
    x[MAX_PEERS:] = torch.randint(-1000, 1000, (PAYLOAD,), generator=gen).float()
    return x


def _peer(master_address: str, k: int, initial_world: int, log_path: str) -> None:
    """One peer: joins, then loops all_reduce / are_peers_pending / update_topology forever."""
    config = CommConfig(timeout_s=OP_TIMEOUT_S, poll_s=0.2, num_connections=1)
    comm = Communicator(master_address, token=TOKEN, config=config)
    contributions: dict[int, torch.Tensor] = {}
    with open(log_path, "a", buffering=1) as log:

        def record(**event: Any) -> None:
            log.write(json.dumps({"k": k, "t": time.time(), **event}) + "\n")

        try:
            comm.connect(timeout_s=60)
            # The first peers wait until the initial world is complete.
            while comm.world_size < initial_world and k < initial_world:
                comm.update_topology(timeout_s=60)
        except CommError as e:
            record(event="join_failed", error=str(e))
            return
        record(event="joined", world=comm.world_size)
        mine = _contribution(k)
        while True:
            # connect() returns where update_topology() returned on the running peers: the
            # all-reduce comes first in the loop so that joiners and running peers stay in step.
            x = mine.clone()
            try:
                info = comm.all_reduce(x, "sum", timeout_s=OP_TIMEOUT_S)
                markers = (x[:MAX_PEERS] == 1.0).nonzero().flatten().tolist()
                ok_markers = bool(torch.all((x[:MAX_PEERS] == 0) | (x[:MAX_PEERS] == 1)))
                expected = torch.zeros(PAYLOAD)
                for p in markers:
                    if p not in contributions:
                        contributions[p] = _contribution(p)[MAX_PEERS:]
                    expected += contributions[p]
                right = (
                    ok_markers
                    and k in markers
                    and len(markers) == info.world_size
                    and torch.equal(x[MAX_PEERS:], expected)
                )
                record(event="ok" if right else "wrong", world=info.world_size, peers=markers)
            except (PeerFailureError, CommTimeoutError) as e:
                record(event="failed", error=type(e).__name__)
            except TopologyError as e:
                record(event="topology_error", error=str(e)[:200])
                if "evicted" in str(e):
                    return
            except CommError as e:  # anything else the master's restart may surface
                record(event="failed", error=type(e).__name__)
            try:
                if comm.are_peers_pending(timeout_s=OP_TIMEOUT_S):
                    comm.update_topology(timeout_s=OP_TIMEOUT_S)
            except (PeerFailureError, CommTimeoutError) as e:
                record(event="phase_failed", error=type(e).__name__)
            except TopologyError as e:
                record(event="topology_error", error=str(e)[:200])
                if "evicted" in str(e):
                    return
            except CommError as e:
                record(event="phase_failed", error=type(e).__name__)


def _joined(log_dir: Path) -> int:
    return sum(path.read_text().count('"event": "joined"') for path in log_dir.glob("peer-*.jsonl"))


def _analyse(log_dir: Path, killed: dict[int, float]) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    for path in log_dir.glob("peer-*.jsonl"):
        for line in path.read_text().splitlines():
            # The last line of a killed peer may be cut.
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    by_peer: dict[int, list[dict[str, Any]]] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        by_peer.setdefault(e["k"], []).append(e)
    ok = [e for e in events if e["event"] == "ok"]
    wrong = [e for e in events if e["event"] == "wrong"]
    failed = [e for e in events if e["event"] in ("failed", "phase_failed")]
    topo = [e for e in events if e["event"] == "topology_error"]
    distinct_ops = sum(1.0 / e["world"] for e in ok)
    longest = 0.0
    retried = 0
    for k, evs in by_peer.items():
        done = [e["t"] for e in evs if e["event"] == "ok"]
        for a, b in itertools.pairwise(done):
            longest = max(longest, b - a)
        for i, e in enumerate(evs):
            if e["event"] == "failed" and any(f["event"] == "ok" for f in evs[i + 1 :]):
                retried += 1
        del k
    return {
        "peer_ops_completed": len(ok),
        "ops_completed": round(distinct_ops),
        "failed": len(failed),
        "failed_and_retried": retried,
        "topology_errors": len(topo),
        "wrong_results": len(wrong),
        "longest_stall_s": round(longest, 2),
        "peers_started": len(by_peer),
        "peers_killed": len(killed),
        "max_world": max((e["world"] for e in ok), default=0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 s instead of two minutes")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--peers", type=int, default=6)
    parser.add_argument("--churn-every", type=float, default=4.0, help="seconds between events")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop-every",
        type=int,
        default=3,
        help="every Nth victim is frozen with SIGSTOP instead of killed (default 3; 0: never)",
    )
    parser.add_argument(
        "--no-master-kills",
        action="store_true",
        help="keep one master for the whole run (default: it kills itself at random commit "
        "messages and is restarted)",
    )
    args = parser.parse_args()
    seconds = args.seconds or (30.0 if args.quick else 120.0)
    rng = random.Random(args.seed)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lowcomm.comm"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    address = f"127.0.0.1:{port}"
    stop_master = threading.Event()
    master_kills: list[float] = []
    keeper = threading.Thread(
        target=_keep_master,
        args=(ctx, port, random.Random(args.seed + 1), stop_master, master_kills),
        kwargs={"every": not args.no_master_kills},
        daemon=True,
    )
    keeper.start()
    log_dir = Path(tempfile.mkdtemp(prefix="lowcomm-churn-"))
    procs: dict[int, Any] = {}
    killed: dict[int, float] = {}
    next_k = 0

    def spawn(initial_world: int) -> None:
        nonlocal next_k
        k = next_k
        next_k += 1
        p = ctx.Process(
            target=_peer, args=(address, k, initial_world, str(log_dir / f"peer-{k}.jsonl"))
        )
        p.start()
        procs[k] = p

    start = time.monotonic()
    adds = stopped = 0
    try:
        for _ in range(args.peers):
            spawn(args.peers)
        # Wait for the initial world before the churn starts.
        while _joined(log_dir) < args.peers and time.monotonic() - start < 120:
            time.sleep(0.2)
        churn_start = time.monotonic()
        while time.monotonic() - churn_start < seconds:
            time.sleep(args.churn_every)
            alive = [k for k, p in procs.items() if p.is_alive() and k not in killed]
            if len(alive) >= args.peers or (len(alive) > 3 and rng.random() < 0.5):
                victim = rng.choice(alive)
                # Some victims are frozen (SIGSTOP) instead: they must be evicted by the
                # heartbeat timeout, the case that froze PCCL's ring for good.
                stop = args.stop_every > 0 and len(killed) % args.stop_every == args.stop_every - 1
                os.kill(procs[victim].pid, signal.SIGSTOP if stop else signal.SIGKILL)
                killed[victim] = time.time()
                stopped += int(stop)
                what = "stopped (SIGSTOP)" if stop else "killed"
                print(f"[{time.monotonic() - churn_start:5.1f} s] {what} peer {victim}", flush=True)
            else:
                spawn(0)
                adds += 1
                print(
                    f"[{time.monotonic() - churn_start:5.1f} s] added peer {next_k - 1}", flush=True
                )
        time.sleep(1.0)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
        for p in procs.values():
            p.join(10)
        stop_master.set()
        keeper.join(10)
    r = _analyse(log_dir, killed)
    r["peers_added"] = adds
    r["peers_stopped"] = stopped
    r["master_kills"] = len(master_kills)
    rows = [
        ("duration (s)", f"{seconds:.0f}"),
        ("peers at start / max world", f"{args.peers} / {r['max_world']}"),
        (
            "peers killed / of them SIGSTOPped / added",
            f"{r['peers_killed']} / {r['peers_stopped']} / {r['peers_added']}",
        ),
        ("master kills (random commit messages)", r["master_kills"]),
        ("all-reduces completed (distinct)", r["ops_completed"]),
        ("all-reduces completed (per peer)", r["peer_ops_completed"]),
        ("failed ops (per peer)", r["failed"]),
        ("failed and then retried successfully", r["failed_and_retried"]),
        ("lockstep/topology errors", r["topology_errors"]),
        ("wrong results (must be 0)", r["wrong_results"]),
        ("longest stall (s)", r["longest_stall_s"]),
    ]
    print(
        f"\nchurn soak: {args.peers} peers on loopback, a peer killed or added every {args.churn_every:g} s"
    )
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{width}}  {b}")
    # A frozen peer is evicted after the heartbeat timeout and the running rings are aborted
    # then; one frozen while a ring is being built still costs that ring's op timeout.
    stall_goal = HEARTBEAT_TIMEOUT_S + OP_TIMEOUT_S
    claims = [
        {
            "name": "wrong_results",
            "value": r["wrong_results"],
            "goal": "== 0",
            "ok": r["wrong_results"] == 0,
        },
        {
            "name": "ops_completed",
            "value": r["ops_completed"],
            "goal": "> 0",
            "ok": r["ops_completed"] > 0,
        },
        {
            "name": "failed_and_retried",
            "value": r["failed_and_retried"],
            "goal": "every failure followed by a successful retry on surviving peers",
            "ok": r["failed_and_retried"] > 0 or r["failed"] == 0,
        },
        {
            "name": "master_kills",
            "value": r["master_kills"],
            "goal": "> 0 (0 with --no-master-kills)",
            "ok": r["master_kills"] > 0 or args.no_master_kills,
        },
        {
            "name": "longest_stall_s",
            "value": r["longest_stall_s"],
            "goal": f"<= {stall_goal:g} (heartbeat timeout + one op timeout)",
            "ok": r["longest_stall_s"] <= stall_goal,
        },
    ]
    print(json.dumps({"benchmark": "churn_soak", "claims": claims}))
    return 0 if all(c["ok"] for c in claims) else 1


if __name__ == "__main__":
    sys.exit(main())
