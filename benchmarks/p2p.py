"""Point-to-point latency over an emulated WAN: a message on a kept connection against a new one.

Two communicators in this process, each sending through lowcomm's shaper (1 Gbit/s, one-way
latency 10 ms, 2 ms with --quick). The first ``send``/``recv`` of a (peer, tag) opens the
connection (TCP handshake, then the HMAC challenge-response); later ones reuse it and cost the
data plus the ack's round trip. Both are timed in the same run, on the same pair of peers.

    .venv/bin/python benchmarks/p2p.py            # 10 ms one-way, 20 messages
    .venv/bin/python benchmarks/p2p.py --quick    # 2 ms one-way, 8 messages

Last line: one JSON object, claim ``kept_vs_new_connection_speedup`` (time of a message that opens
its connection over the median time of one on a kept connection).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lowcomm.comm import CommConfig, Communicator, Master
from lowcomm.comm.shaper import Shaper

TOKEN = b"p2p-benchmark-0123456789abcdef"


def _pair(master: str, config: CommConfig) -> tuple[Communicator, Communicator]:
    a = Communicator(master, token=TOKEN, config=config)
    b = Communicator(master, token=TOKEN, config=config)
    a.connect(timeout_s=30)
    joined = threading.Thread(target=b.connect, kwargs={"timeout_s": 30})
    joined.start()
    deadline = time.monotonic() + 30
    while a.world_size < 2 and time.monotonic() < deadline:
        a.update_topology(timeout_s=30)
    joined.join(30)
    if a.world_size < 2 or b.world_size < 2:
        raise SystemExit("the two peers did not form a world within 30 s")
    return a, b


def _message(a: Communicator, b: Communicator, x: torch.Tensor, tag: int) -> float:
    out = torch.empty_like(x)
    t0 = time.perf_counter()
    receiver = threading.Thread(
        target=b.recv, args=(out,), kwargs={"from_": a.peer_id, "tag": tag, "timeout_s": 30}
    )
    receiver.start()
    a.send(x, to=b.peer_id, tag=tag, timeout_s=30)
    receiver.join(30)
    seconds = time.perf_counter() - t0
    if not torch.equal(out, x):
        raise SystemExit("the received tensor differs from the sent one")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 ms latency, fewer messages")
    args = parser.parse_args()
    latency_ms, count = (2.0, 8) if args.quick else (10.0, 20)
    shaper = Shaper(bandwidth_bps=1e9, latency_ms=latency_ms)
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=10.0).start()
    a, b = _pair("{}:{}".format(*master.address), CommConfig(timeout_s=30.0, shaper=shaper))
    try:
        x = torch.randn(1024)  # 4 KiB: latency-bound, like an activation of a small micro-batch
        # A new tag per message: each one opens its connection, as every message did before.
        new = [_message(a, b, x, tag=1000 + i) for i in range(count)]
        kept = [_message(a, b, x, tag=1) for _ in range(count + 1)][1:]
    finally:
        a.close()
        b.close()
        master.stop()
    new_s, kept_s = statistics.median(new), statistics.median(kept)
    speedup = new_s / kept_s
    print(f"4 KiB message, shaper 1 Gbit/s + {latency_ms:g} ms one-way, median of {count}")
    print(f"  new connection per message  {new_s * 1e3:7.1f} ms")
    print(f"  kept connection             {kept_s * 1e3:7.1f} ms   ({speedup:.2f}x)")
    claim = {"name": "kept_vs_new_connection_speedup", "value": round(speedup, 2), "goal": 2.0}
    claim["ok"] = speedup >= 2.0
    print(json.dumps({"benchmark": "p2p", "quick": args.quick, "claims": [claim]}))


if __name__ == "__main__":
    main()
