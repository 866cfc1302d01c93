"""``lowcomm master``: run a run's master (membership, admission, phases); it holds no tensors.

``--config run.toml`` is the run's configuration (``lowcomm.launch.run_config``): validated here at
start, every error naming the field, then handed to every joining peer. Restarting the master on
the same address does not end the run: peers re-register on their own.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import threading

NAME = "master"
HELP = "run the master of a run: membership, admission, phases (holds no tensors)"

logger = logging.getLogger(__name__)


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
        "--config",
        default=None,
        metavar="RUN.TOML",
        help="the run configuration (task, [settings], [outer], [checkpoint]); default: the "
        "tiny GPT task",
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
    from lowcomm.errors import LowcommError
    from lowcomm.launch.join_cmd import read_token
    from lowcomm.launch.run_config import load_run_config, parse_run_config

    token = read_token(args.token_file)
    cfg = load_run_config(args.config) if args.config else parse_run_config("")
    master = Master(
        args.listen,
        token=token,
        config_blob=cfg.text.encode(),
        heartbeat_timeout_s=args.heartbeat_timeout,
        encryption=not args.no_encryption,
    )
    try:
        master.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LowcommError(
                f"cannot listen on {args.listen}: the address is in use (another master?); "
                "stop that process or pick another port with --listen HOST:PORT"
            ) from None
        raise LowcommError(f"cannot listen on {args.listen}: {exc.strerror}") from None
    host, port = master.address
    if token is None:
        logger.warning(
            "no --token-file: anyone who can reach %s:%d can join this run and read its "
            "configuration; make a token with `lowcomm token new`",
            host,
            port,
        )
    logger.info("run configuration: %s", cfg.describe())
    # Scripts (and tests) parse this line to learn the port when --listen asked for port 0.
    print(f"lowcomm master listening on {host}:{port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("master stopping", file=sys.stderr)
    finally:
        master.stop()
    return 0
