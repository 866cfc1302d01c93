"""``lowcomm master``: run a run's master (membership, admission, phases); it holds no tensors.

Restarting it on the same address does not end the run: peers re-register on their own.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

NAME = "master"
HELP = "run the master of a run: membership, admission, phases (holds no tensors)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", default="0.0.0.0:48000", help="HOST:PORT to listen on (default 0.0.0.0:48000)"
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="file holding the run token (whitespace stripped); without it, no authentication",
    )
    parser.add_argument(
        "--config-file", default=None, help="file whose bytes every joining peer downloads"
    )
    parser.add_argument(
        "--no-encryption",
        action="store_true",
        help="send frames unencrypted after the token proof (trusted networks only; every peer "
        "must then use CommConfig(encryption=False))",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=10.0,
        help="seconds without a heartbeat before a peer is evicted (default 10)",
    )


def run(args: argparse.Namespace) -> int:
    from lowcomm.comm.master import Master

    token = None
    if args.token_file:
        token = Path(args.token_file).read_bytes().strip()
        if not token:
            raise SystemExit(f"--token-file {args.token_file} is empty")
    blob = Path(args.config_file).read_bytes() if args.config_file else b""
    try:
        master = Master(
            args.listen,
            token=token,
            config_blob=blob,
            heartbeat_timeout_s=args.heartbeat_timeout,
            encryption=not args.no_encryption,
        ).start()
    except ValueError as exc:  # a weak token: one line saying how to make a good one
        raise SystemExit(f"lowcomm master: {exc}") from None
    host, port = master.address
    # Scripts (and tests) parse this line to learn the port when --listen asked for port 0.
    print(f"lowcomm master listening on {host}:{port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("master stopping", file=sys.stderr)
    finally:
        master.stop()
    return 0
