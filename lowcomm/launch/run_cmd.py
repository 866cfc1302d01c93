"""``lowcomm run``: several local peers train the tiny GPT with an outer loop over an emulated WAN.

The demo without its scripted fault and comparison: pick the method, the peers, the link, and
watch the progress. Every peer is a process on this machine talking through lowcomm's shaper.
"""

from __future__ import annotations

import argparse
import logging
import os

from lowcomm.launch import local_run

NAME = "run"
HELP = "train with several local peers over an emulated WAN (pick method, peers, link)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    local_run.add_arguments(
        parser, peers=2, steps=200, method="diloco", bandwidth_mbps=100.0, latency_ms=10.0
    )


def run(args: argparse.Namespace) -> int:
    from lowcomm.comm import Master
    from lowcomm.launch.peer import PeerSpec, outer_steps_for

    if args.peers < 1 or args.steps < args.sync_every:
        raise SystemExit("--peers must be >= 1 and --steps at least --sync-every")
    if args.log_level is None:
        logging.getLogger("lowcomm.comm").setLevel(logging.ERROR)
    try:
        outer = local_run.outer_config(args)
        gpt = local_run.gpt_config(args)
    except ValueError as exc:
        raise SystemExit(f"bad settings: {exc}") from None
    token = os.urandom(16)
    master = Master(("127.0.0.1", 0), token=token, heartbeat_timeout_s=10.0).start()
    num_outer = outer_steps_for(outer, args.steps)
    specs = [
        PeerSpec(
            master="{}:{}".format(*master.address),
            token=token,
            index=i,
            num_peers=args.peers,
            outer=outer,
            gpt=gpt,
            batch_size=args.batch_size,
            outer_steps=num_outer,
            bandwidth_bps=args.bandwidth_mbps * 1e6,
            latency_ms=args.latency_ms,
            seed=args.seed,
            report_every=max(1, args.sync_every // 2),
            evaluate_at_end=(i == 0),
        )
        for i in range(args.peers)
    ]
    try:
        phase = local_run.run_phase(
            args.method, specs, total_steps=args.steps, kill_index=None, timeout_s=3600
        )
    finally:
        master.stop()
    r0 = phase.results[0]
    hashes = {r["hash"] for r in phase.results.values()}
    print(
        f"{args.method}: {r0['inner_steps']} inner steps, {r0['outer_steps']} outer steps in "
        f"{r0['wall_s']:.0f} s; validation loss {r0['val_loss']:.3f}; sent "
        f"{r0['tx_bytes'] / 1e6:.2f} MB per peer; blocked on the network "
        f"{r0['comm_wait_s']:.1f} s"
    )
    if len(hashes) != 1:
        print(f"ERROR: the peers' outer parameters differ ({len(hashes)} distinct hashes)")
        return 1
    print(f"outer parameters bit-identical on all {len(phase.results)} peers: {hashes.pop()[:16]}")
    return 0
