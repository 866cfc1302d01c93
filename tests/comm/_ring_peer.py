"""One ring peer as a separate process, for the fault tests in test_ring.py.

Protocol on stdio: prints its listener address as a JSON line, reads the ring's addresses as a
JSON line, runs one in-place all-reduce (optionally with a fault injected on itself), prints a JSON
line with the outcome. Run as ``python tests/comm/_ring_peer.py '<json config>'``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from lowcomm.comm import PeerListener, connect_ring
from lowcomm.comm.errors import CommError
from lowcomm.faults import FaultInjector


def main() -> None:
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    rank, token = cfg["rank"], cfg["token"].encode()
    listener = PeerListener("127.0.0.1", 0, token=token)
    print(json.dumps({"address": listener.address}), flush=True)
    addresses = [tuple(a) for a in json.loads(sys.stdin.readline())]
    faults = None
    if rank == cfg["fault_rank"]:
        # Sub-chunk 1 of the fault step: the victim dies (kill: os._exit, sockets torn down by the
        # OS) or freezes (stop: SIGSTOP, and the frame never leaves) in the middle of the operation.
        faults = FaultInjector()
        faults.inject(
            "ring.send",
            kill=cfg["fault"] == "kill",
            stop=cfg["fault"] == "stop",
            where={"step": cfg["fault_step"], "sub": 1},
        )
    ring = connect_ring(
        listener=listener,
        rank=rank,
        addresses=addresses,
        ring_id="fault-test",
        token=token,
        num_connections=2,
        timeout_s=60,
        subchunk_bytes=cfg["subchunk_bytes"],
        faults=faults,
    )
    x = torch.randn(cfg["numel"], generator=torch.Generator().manual_seed(rank))
    before = hashlib.sha256(x.numpy().tobytes()).hexdigest()
    start = time.monotonic()
    outcome: dict[str, object] = {"rank": rank}
    try:
        ring.all_reduce(x, "sum", timeout_s=cfg["timeout_s"])
        outcome["error"] = None
    except CommError as exc:
        outcome["error"] = type(exc).__name__
        outcome["message"] = str(exc)
    outcome["elapsed_s"] = time.monotonic() - start
    outcome["untouched"] = hashlib.sha256(x.numpy().tobytes()).hexdigest() == before
    print(json.dumps(outcome), flush=True)
    ring.close()
    listener.close()


if __name__ == "__main__":
    main()
