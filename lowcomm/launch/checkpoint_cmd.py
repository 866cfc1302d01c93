"""``lowcomm checkpoint list|verify|export``: look into a checkpoint level and leave with the model.

    lowcomm checkpoint list /ckpt/run1
    lowcomm checkpoint verify /ckpt/run1 [--step N]
    lowcomm checkpoint export /ckpt/run1 model.pt [--step N] [--key diloco/model]
    lowcomm checkpoint export s3://bucket/run1 out_dir --format dcp

``export`` assembles every sharded tensor whole (from any number of saved ranks) and writes a
plain ``torch.save`` file or a DCP directory (``torch.distributed.checkpoint``). Errors are one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

NAME = "checkpoint"
HELP = "list, verify or export the checkpoints of a level (a directory or fsspec URL)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="committed steps, their ranks, sizes and metadata")
    ls.add_argument("level", help="the level: a local directory or an fsspec URL")
    verify = sub.add_parser("verify", help="read every chunk of every rank, check its checksum")
    verify.add_argument("level")
    verify.add_argument("--step", type=int, default=None, help="one step (default: all)")
    export = sub.add_parser("export", help="write a step as whole tensors (torch.save or DCP)")
    export.add_argument("level")
    export.add_argument("out", help="the file (torch) or directory (dcp) to write")
    export.add_argument("--step", type=int, default=None, help="the step (default: the newest)")
    export.add_argument(
        "--key",
        default=None,
        help="export only this part of the state, a /-separated path (a Trainer's model: "
        "diloco/model)",
    )
    export.add_argument("--format", choices=("torch", "dcp"), default="torch")
    for p in (ls, verify, export):
        p.add_argument(
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="fsspec storage option for a remote URL (repeatable)",
        )


def _options(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _select(state: Any, key: str | None) -> Any:
    if key is None:
        return state
    for part in key.strip("/").split("/"):
        if not isinstance(state, dict) or part not in state:
            have = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"--key {key!r}: no {part!r} here (have: {have})")
        state = state[part]
    return state


def _run(args: argparse.Namespace) -> int:
    from lowcomm.checkpoint.errors import NoCheckpointError
    from lowcomm.checkpoint.reader import CheckpointReader

    with CheckpointReader(args.level, storage_options=_options(args.storage_option)) as reader:
        steps = reader.steps()
        if args.action == "list":
            if not steps:
                print(f"no committed checkpoints at {args.level}")
            for s in steps:
                info = reader.summary(s)
                print(
                    f"step {s}: {info.world_size} rank(s), {info.total_bytes / 1e6:.1f} MB "
                    f"({info.stored_bytes / 1e6:.1f} MB stored), {info.num_tensors} tensors/rank"
                    + (f", {info.metadata}" if info.metadata else "")
                )
            return 0
        if not steps:
            raise NoCheckpointError(f"no committed checkpoints at {args.level}")
        if args.action == "verify":
            for s in [args.step] if args.step is not None else steps:
                checked = reader.verify(s)
                print(f"step {s}: ok ({checked / 1e6:.1f} MB checked)")
            return 0
        step = steps[-1] if args.step is None else args.step
        state = _select(reader.load_full(step), args.key)
        if args.format == "torch":
            import torch

            torch.save(state, args.out)
        else:
            import warnings

            import torch.distributed.checkpoint as dcp

            if not isinstance(state, dict):
                raise ValueError("--format dcp needs a dict state: pick one with --key")
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(state, checkpoint_id=args.out, no_dist=True)
        print(f"exported step {step} to {args.out} ({args.format})")
        return 0


def run(args: argparse.Namespace) -> int:
    from lowcomm.checkpoint.errors import CheckpointError

    try:
        return _run(args)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"lowcomm checkpoint {args.action}: error: {e}", file=sys.stderr)
        return 1
