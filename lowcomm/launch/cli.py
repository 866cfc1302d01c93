"""The ``lowcomm`` command line: one subcommand per module listed in ``_COMMANDS``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
(and imports torch only inside ``run``, so ``--help`` stays instant); adding a subcommand is
importing its module here and listing it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from lowcomm._version import __version__
from lowcomm.errors import LowcommError
from lowcomm.launch import checkpoint_cmd, demo, join_cmd, master_cmd, run_cmd, token_cmd
from lowcomm.launch.logs import setup_logging

__all__ = ["build_parser", "main", "one_line"]

_COMMANDS: tuple[ModuleType, ...] = (
    demo,
    master_cmd,
    run_cmd,
    join_cmd,
    token_cmd,
    checkpoint_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser; tests freeze its flag set."""
    parser = argparse.ArgumentParser(
        prog="lowcomm",
        description="Fault-tolerant, low-communication training across far-apart GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"lowcomm {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING or ERROR")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowcomm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (LowcommError, OSError, ValueError) as exc:
        # Bad input and runtime failures are one line naming the problem and the fix; --debug
        # shows where it came from.
        if args.debug:
            raise
        print(f"lowcomm {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (an OSError without one: its errno name)."""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
