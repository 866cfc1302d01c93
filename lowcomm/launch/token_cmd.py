"""``lowcomm token new``: print a fresh random run token (256 bits from ``secrets``).

Every process of a run (the master and each peer) must be given the same token, e.g. in a file
passed with ``--token-file`` (readable by its owner only) or the ``LOWCOMM_TOKEN`` variable.
"""

from __future__ import annotations

import argparse

NAME = "token"
HELP = "make a run token: `lowcomm token new` prints a random one"

# 32 random bytes, base64url: 43 characters, 256 bits (the handshake needs at least 128).
_TOKEN_BYTES = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    sub.add_parser(
        "new",
        help="print a new random run token (save it to a file readable only by you)",
        description="Prints a new random run token: 32 bytes from `secrets`, base64url-encoded.",
    )


def new_token() -> str:
    """A fresh run token: 256 random bits as 43 base64url characters."""
    import secrets

    return secrets.token_urlsafe(_TOKEN_BYTES)


def run(args: argparse.Namespace) -> int:
    if args.token_command == "new":
        print(new_token(), flush=True)
        return 0
    raise SystemExit(f"lowcomm token: unknown action {args.token_command!r}; use `new`")
