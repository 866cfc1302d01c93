"""``lowcomm join ADDRESS``: a volunteer node joins a run, trains the run's task, leaves on Ctrl-C.

It authenticates with the run token and downloads the run's configuration (the TOML text given to
``lowcomm master --config``; see ``lowcomm.launch.run_config``). The volunteer chooses what code it
runs: it names the task it agrees to train (``--task package.module:function``, imported from its
own installed packages) or confirms the run's (``--accept-task``); a different task is refused.
It then receives the current outer state from the running peers, or, when it is alone, resumes the
run from its remote level (``[checkpoint] remote``), and trains with a progress bar. It checkpoints
locally every few outer steps and resumes from that checkpoint after a crash or a reboot. Ctrl-C
finishes the step (and the all-reduce in flight), checkpoints, tells the master it leaves, and
exits 0; a second Ctrl-C quits at once.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowcomm.launch.run_config import RunConfig
    from lowcomm.launch.task import Task
    from lowcomm.launch.volunteer import RunArchive
    from lowcomm.trainer import Trainer

NAME = "join"
HELP = "join a run as a volunteer peer: authenticate, agree on the task, train, leave on Ctrl-C"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="the master's HOST:PORT")
    parser.add_argument("--token-file", default=None, help="file holding the run token")
    parser.add_argument(
        "--task",
        default=None,
        metavar="PACKAGE.MODULE:FUNCTION",
        help="the task you agree to train (installed on this machine); must be the run's",
    )
    parser.add_argument(
        "--accept-task",
        action="store_true",
        help="train whatever task the run names (printed first); it must be installed here",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where this volunteer checkpoints (default: ~/.local/state/lowcomm/join/<run>)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=5,
        help="outer steps between local checkpoints (default 5)",
    )
    parser.add_argument("--index", type=int, default=None, help="data seed (default random)")
    parser.add_argument("--outer-steps", type=int, default=None, help="stop at this outer step")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per blocking call")


def read_token(path: str | None) -> bytes | None:
    """The run token from ``path`` (whitespace stripped); ValueError saying what to do."""
    if path is None:
        return None
    try:
        token = Path(path).read_bytes().strip()
    except FileNotFoundError:
        raise ValueError(
            f"token file {path} does not exist: ask the run's operator for the token "
            "(or make one with `lowcomm token new`)"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"token file {path} is empty: put the run token in it")
    return token


def connect(
    address: str,
    token: bytes | None,
    *,
    timeout_s: float,
    before_admission: Callable[[bytes], None] | None = None,
) -> Any:
    """A connected ``Communicator``; a ``LowcommError`` whose message says what to fix.

    ``before_admission(config_blob)`` runs once registered, before the running peers admit this
    one (``Communicator.connect``): check the run there and build what is slow to build.
    """
    from lowcomm.comm import CommConfig, Communicator
    from lowcomm.comm.errors import AuthenticationError, CommError, PeerFailureError
    from lowcomm.errors import LowcommError

    comm = Communicator(address, token=token, config=CommConfig(timeout_s=timeout_s))
    try:
        comm.connect(timeout_s=timeout_s * 5, before_admission=before_admission)
    except AuthenticationError:
        comm.close()
        hint = "pass --token-file" if token is None else "check that --token-file holds it"
        raise LowcommError(
            f"the master at {address} refused this peer's run token: {hint} (ask the run's "
            "operator for the token)"
        ) from None
    except (PeerFailureError, OSError) as exc:
        comm.close()
        raise LowcommError(
            f"cannot reach the master at {address} ({exc}): check the address and that "
            "`lowcomm master` runs there"
        ) from None
    except CommError:
        comm.close()
        raise
    return comm


def agree_on_task(cfg: RunConfig, *, task: str | None, accept: bool) -> None:
    """Refuses a run whose task the volunteer did not choose (ValueError naming both)."""
    if task is not None:
        if task != cfg.task:
            raise ValueError(
                f"the run trains task {cfg.task}, not the {task} you agreed to (--task): "
                f"rerun with --task {cfg.task} if you trust it"
            )
        return
    if not accept:
        raise ValueError(
            f"the run trains task {cfg.task}: rerun with --task {cfg.task} to agree to it "
            "(or --accept-task to train whatever the run names)"
        )
    print(f"the run trains {cfg.describe()} (--accept-task)", flush=True)


def default_checkpoint_dir(address: str, task: str) -> Path:
    """``$XDG_STATE_HOME/lowcomm/join/<hash of address and task>`` (one per run)."""
    digest = hashlib.sha256(f"{address}\n{task}".encode()).hexdigest()[:12]
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state) / "lowcomm" / "join" / digest


def run(args: argparse.Namespace) -> int:
    from lowcomm.launch.run_config import parse_run_config
    from lowcomm.launch.task import TaskConfig, build_task

    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.log_level is None:
        # The comm layer narrates every connection at INFO; a volunteer watches its progress bar.
        logging.getLogger("lowcomm.comm").setLevel(logging.WARNING)
    token = read_token(args.token_file)
    prepared: dict[str, Any] = {}

    def prepare(blob: bytes) -> None:
        # Before the running peers admit us: refuse the run, or build the task (slow), first.
        try:
            cfg = parse_run_config(blob)
        except ValueError as exc:
            raise ValueError(f"cannot use the run's configuration: {exc}") from None
        agree_on_task(cfg, task=args.task, accept=args.accept_task)
        seed = args.index if args.index is not None else int.from_bytes(os.urandom(2), "big")
        prepared["cfg"] = cfg
        prepared["task"] = build_task(cfg.task, TaskConfig(settings=cfg.settings, seed=seed))

    comm = connect(args.address, token, timeout_s=args.timeout, before_admission=prepare)
    try:
        return _train(args, comm, prepared["cfg"], prepared["task"])
    finally:
        comm.close()  # tells the master at once: the others do not wait for a heartbeat timeout


def _train(args: argparse.Namespace, comm: Any, cfg: RunConfig, task: Task) -> int:
    from lowcomm.checkpoint import CheckpointConfig
    from lowcomm.launch.volunteer import RunArchive, open_trainer

    ckpt_dir = Path(args.checkpoint_dir or default_checkpoint_dir(args.address, cfg.task))
    stateful = {"data": task.data} if hasattr(task.data, "state_dict") else {}
    model = task.model
    trainer = open_trainer(
        model,
        task.inner_optimizer(model.parameters()),
        comm,
        outer=cfg.outer,
        checkpoint=CheckpointConfig(levels=(str(ckpt_dir / "local"),), keep_last_local=2),
        checkpoint_every_outer=args.checkpoint_every,
        stateful=stateful,
    )
    if trainer.resumed_from is not None:
        logger.info(
            "resumed from the local checkpoint of inner step %d (outer step %d%s; restored %s)",
            trainer.inner_step,
            trainer.outer_step,
            ", the live run's" if trainer.joining else "",
            ", ".join(["inner optimizer", *stateful]),
        )
    archive = None
    if cfg.checkpoint.remote is not None:
        archive = RunArchive(cfg.checkpoint.remote, staging_dir=ckpt_dir / "run-outer")
        if comm.world_size == 1:
            _resume_run(trainer, archive)
    print(
        f"{'joined' if comm.world_size > 1 else 'started'} the run: world of {comm.world_size}, "
        f"outer step {trainer.outer_step}",
        flush=True,
    )
    limits = [n for n in (args.outer_steps, cfg.outer_steps) if n is not None]
    target = min(limits) if limits else None
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, _on_sigint(stop))
    progress = _Progress(trainer, comm, task.tokens_per_batch, target)
    try:
        with progress:
            while not stop.is_set() and (target is None or trainer.outer_step < target):
                try:
                    batch = next(task.data)
                except StopIteration:
                    logger.info("the task's data ended at inner step %d", trainer.inner_step)
                    break
                loss = task.loss(model, batch)
                loss.backward()
                before = trainer.outer_step
                trainer.step()
                progress.update(float(loss.detach()))
                if archive is not None and trainer.outer_step != before:
                    _archive(trainer, comm, archive, cfg, final=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        trainer.save()  # waits for the all-reduce in flight: its average is in the checkpoint
        trainer.close()
    else:
        trainer.finish()
    if archive is not None:
        _archive(trainer, comm, archive, cfg, final=True)
        archive.close()
    if stop.is_set():
        logger.info(
            "left the run at outer step %d (inner step %d); checkpoint in %s",
            trainer.outer_step,
            trainer.inner_step,
            ckpt_dir,
        )
        return 0
    print(
        f"done at outer step {trainer.outer_step}: outer-hash {trainer.diloco.outer_hash()[:16]}",
        flush=True,
    )
    return 0


def _resume_run(trainer: Trainer, archive: RunArchive) -> None:
    """Alone in the run: continue from the run's remote outer state if it is newer than ours."""
    outer = archive.latest()
    if outer is None:
        return
    step = int(outer["outer_step"][0])
    if step <= trainer.outer_step:
        return
    trainer.load_outer_state(outer)
    logger.info(
        "no live peers: continuing the run from outer step %d, saved at %s (outer-hash %s)",
        step,
        archive.remote,
        trainer.diloco.outer_hash()[:16],
    )


def _archive(
    trainer: Trainer, comm: Any, archive: RunArchive, cfg: RunConfig, *, final: bool
) -> None:
    """Rank 0 saves the outer state every ``[checkpoint].every`` outer steps; the last peer to
    leave saves it as it goes, so the run outlives its peers."""
    if final:
        due = comm.world_size == 1 or comm.rank == 0
    else:
        due = comm.rank == 0 and trainer.outer_step % cfg.checkpoint.every == 0
    if due and trainer.outer_step > 0:
        archive.save(trainer.outer_state())


def _on_sigint(stop: threading.Event) -> Any:
    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        logger.info("Ctrl-C: leaving the run after this step (Ctrl-C again to quit at once)")

    return handler


class _Progress:
    """A tqdm bar on a terminal (loss, tokens/s, outer step, peers, bytes sent), log lines kept
    off it; elsewhere one line per outer step."""

    def __init__(self, trainer: Trainer, comm: Any, tokens: int, target: int | None):
        self.trainer, self.comm, self.tokens, self.target = trainer, comm, tokens, target
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self._redirect: Any = None
        self._last_outer = trainer.outer_step
        self._t, self._n, self._rate = time.perf_counter(), trainer.inner_step, 0.0

    def __enter__(self) -> _Progress:
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import (
                logging_redirect_tqdm,
            )

            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("lowcomm")])
            self._redirect.__enter__()
            self.bar = tqdm(
                total=self.target,
                initial=self.trainer.outer_step,
                unit="outer step",
                dynamic_ncols=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)

    def update(self, loss: float) -> None:
        from lowcomm.launch.local_run import format_bytes

        t = time.perf_counter()
        outer = self.trainer.outer_step
        if t - self._t >= 1.0 or outer != self._last_outer:
            self._rate = (self.trainer.inner_step - self._n) * self.tokens / max(t - self._t, 1e-9)
            self._t, self._n = t, self.trainer.inner_step
        fields = (
            f"loss {loss:.3f}",
            f"{self._rate:,.0f} tok/s",
            f"peers {self.comm.world_size}",
            f"sent {format_bytes(self.trainer.stats.tx_bytes)}",
        )
        if self.bar is not None:
            self.bar.set_postfix_str(f"outer {outer}, " + ", ".join(fields), refresh=False)
            self.bar.update(outer - self._last_outer)
        elif outer != self._last_outer:
            print(f"outer step {outer}: " + ", ".join(fields), flush=True)
        self._last_outer = outer
