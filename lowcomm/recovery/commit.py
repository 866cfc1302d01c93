"""A step's commit off the pipeline's critical path: the vote in flight and a step undone bit for bit.

Without it, every stage waits for the world-wide vote on step t (a master round trip that can only
close once the last stage, stage 0, finished) before it applies step t and starts step t + 1: the
round trip sits on every step's critical path. Instead a stage that voted ok on step t applies the
optimizer step *tentatively* (``TentativeStep.apply``: a copy of its parameters and optimizer
state is kept first) and starts attempt t + 1 while its vote is in flight (``Ballot``). The
verdict then decides:

- commit: the copy is dropped; ``committed`` is reported and the checkpoint written only now, so
  nothing outside the stage (a checkpoint, a recovery source, a (de)embedding copy, DiLoCo) ever
  sees a step that was not committed everywhere;
- anything else: the ``Ballot`` sets the stage's abort event as the verdict arrives (so attempt
  t + 1 gives up within a slice, as after a lost peer), the copy is put back bit for bit
  (``TentativeStep.undo``) and the stage goes on exactly as if it had never stepped: step t is
  retried after recovery. The messages of the abandoned attempt carry an epoch the retry never
  waits for (``pipeline``), so none of them is ever used.

The model the pipeline trains, step by step, is therefore the same as with the blocking vote, bit
for bit; the attempt of t + 1 costs nothing more when t fails (it is aborted), and when it commits
the round trip ran during attempt t + 1's compute. ``Votes`` starts a stage's votes and runs its
watcher loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable

import torch
from torch import nn

from lowcomm.comm import CommError, Communicator, VoteResult
from lowcomm.recovery.config import PipelineConfig
from lowcomm.recovery.errors import PipelineError
from lowcomm.recovery.replicas import OuterState

__all__ = ["WATCH_S", "Ballot", "TentativeStep", "Votes", "may_run_ahead"]

logger = logging.getLogger(__name__)

WATCH_S = 0.1  # the watcher's probe interval


class Ballot:
    """One vote (``comm.vote(key, ok)``) running on ``pool``; see the module docstring.

    If its verdict is anything but a commit at ``revision`` (or the vote raised), ``on_bad(why)``
    runs on the vote's thread as soon as it is known, before ``result()`` returns; ``bad()`` is
    True from then on. ``result()`` waits for the ``VoteResult`` (or raises ``CommError``).
    """

    def __init__(
        self,
        pool: concurrent.futures.ThreadPoolExecutor,
        comm: Communicator,
        key: str,
        ok: bool,
        *,
        revision: int,
        timeout_s: float,
        on_bad: Callable[[str], None] | None = None,
        stage: int = 0,
    ) -> None:
        self.why = ""
        self._bad = threading.Event()

        def vote() -> VoteResult:
            try:
                res = comm.vote(key, ok, timeout_s=timeout_s)
            except CommError as exc:
                self._set_bad(f"the vote {key} failed: {exc}", on_bad)
                raise PipelineError(f"stage {stage}: the vote {key} failed: {exc}") from exc
            if not (res.ok and res.revision == revision):
                self._set_bad(
                    f"the step before was voted down ({key}: failed {res.failed}, revision "
                    f"{revision} -> {res.revision})",
                    on_bad,
                )
            return res

        self._future = pool.submit(vote)

    def _set_bad(self, why: str, on_bad: Callable[[str], None] | None) -> None:
        self.why = why
        self._bad.set()  # before on_bad: a reader that sees the abort cleared still sees this
        if on_bad is not None:
            on_bad(why)

    def bad(self) -> bool:
        """True once the verdict is known and is not a commit."""
        return self._bad.is_set()

    def wait(self) -> None:
        """Waits for the verdict (or the vote's error), raising nothing."""
        concurrent.futures.wait([self._future])

    def result(self) -> VoteResult:
        res: VoteResult = self._future.result()
        return res


class TentativeStep:
    """``apply`` steps the optimizer keeping a copy of what it changes; ``undo`` puts it back.

    The copy lives in buffers reused from step to step (no allocation per step once the shapes are
    known): each parameter, and each tensor of its optimizer state (a parameter without state yet,
    as before its first step, gets none back).
    """

    def __init__(self) -> None:
        self._params: list[torch.Tensor] = []
        self._state: list[dict[str, object]] = []  # reused buffers (tensors) and plain values
        self._had: list[bool] = []  # the parameter had optimizer state before ``apply``
        self._held: tuple[nn.Module, torch.optim.Optimizer] | None = None

    @property
    def pending(self) -> bool:
        """True between ``apply`` and ``commit`` / ``undo``."""
        return self._held is not None

    def apply(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        params = list(module.parameters())
        if [p.shape for p in self._params] != [p.shape for p in params]:
            self._params = [torch.empty_like(p) for p in params]
            self._state = [{} for _ in params]
        self._had = [False] * len(params)
        with torch.no_grad():
            for i, p in enumerate(params):
                self._params[i].copy_(p)
                state = optimizer.state.get(p)
                if not state:
                    continue
                self._had[i] = True
                saved = self._state[i]
                for k in [k for k in saved if k not in state]:
                    del saved[k]
                for k, v in state.items():
                    buf = saved.get(k)
                    if isinstance(v, torch.Tensor):
                        if not (isinstance(buf, torch.Tensor) and _same(buf, v)):
                            saved[k] = buf = torch.empty_like(v)
                        buf.copy_(v)
                    else:
                        saved[k] = v
        self._held = (module, optimizer)
        optimizer.step()

    def commit(self, optimizer: torch.optim.Optimizer) -> None:
        """The step committed: the pending one is kept (its copy's buffers stay, for reuse);
        without one pending, ``optimizer`` steps now."""
        if self._held is None:
            optimizer.step()
        self._held = None

    def undo(self) -> None:
        """Puts back the parameters and optimizer state as they were before ``apply``."""
        assert self._held is not None
        module, optimizer = self._held
        with torch.no_grad():
            for i, p in enumerate(module.parameters()):
                p.copy_(self._params[i])
                if not self._had[i]:
                    optimizer.state.pop(p, None)
                    continue
                saved, live = self._state[i], optimizer.state[p]
                for k in [k for k in live if k not in saved]:
                    del live[k]
                for k, v in saved.items():
                    cur = live.get(k)
                    if isinstance(v, torch.Tensor):
                        if isinstance(cur, torch.Tensor) and _same(cur, v):
                            cur.copy_(v)
                        else:
                            live[k] = v.clone()
                    else:
                        live[k] = v
        self._held = None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


class Votes:
    """A stage's votes (``start``: a ``Ballot`` each, on a thread of its own) and its watcher loop
    (``watch``), both setting the stage's ``abort`` event through ``on_abort(why)``; the stage is
    ``comm.peer_group``.

    A vote waits up to ``2 * timeout_s`` plus the heartbeat timeout: a stage that failed on its own
    votes at once, while the others may still wait out a receive (``timeout_s``) and an eviction
    (the heartbeat timeout) before voting. A vote that fails raises ``PipelineError``.
    """

    def __init__(
        self,
        comm: Communicator,
        timeout_s: float,
        *,
        abort: threading.Event,
        stop: threading.Event,
        on_abort: Callable[[str], None],
    ) -> None:
        self.comm = comm
        self.stage = stage = comm.peer_group
        self.timeout_s = timeout_s
        self.abort = abort
        self.stop = stop
        self.on_abort = on_abort
        self.last: Ballot | None = None  # the vote started last
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"stage{stage}-vote"
        )

    def start(self, key: str, ok: bool, *, revision: int, abort: bool) -> Ballot:
        """Starts the vote ``key``; with ``abort``, a verdict other than a commit at ``revision``
        aborts the stage as it arrives (an attempt runs ahead of it)."""
        wait_s = 2 * self.timeout_s + self.comm.heartbeat_timeout_s
        on_bad = self.on_abort if abort else None
        self.last = Ballot(
            self._pool,
            self.comm,
            key,
            ok,
            revision=revision,
            timeout_s=wait_s,
            on_bad=on_bad,
            stage=self.stage,
        )
        return self.last

    def settle(self) -> None:
        """Waits until the vote started last (if any) has its verdict (whatever it is)."""
        if self.last is not None:
            self.last.wait()

    def start_watch(self, expected: Callable[[], int | None]) -> None:
        """Starts the watcher thread (until ``stop``): every ``WATCH_S`` it asks the master for its
        membership revision; if it is not ``expected()`` (None: not watching), aborts the stage."""
        name = f"stage{self.stage}-watch"
        threading.Thread(target=self._watch, args=(expected,), name=name, daemon=True).start()

    def _watch(self, expected: Callable[[], int | None]) -> None:
        while not self.stop.wait(WATCH_S):
            want = expected()
            if want is None or self.abort.is_set():
                continue
            try:
                rev = self.comm.live_revision(timeout_s=2.0)
            except CommError as exc:
                logger.debug("stage %d: membership probe failed: %s", self.stage, exc)
                continue
            if rev != want and expected() == want:
                self.on_abort(f"the membership moved (revision {want} -> {rev}): a peer was lost")

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def may_run_ahead(
    outer: OuterState | None, step: int, num_steps: int, config: PipelineConfig
) -> bool:
    """True if attempt ``step`` may run on a tentative step: it is one of the ``num_steps`` and it
    does not start with DiLoCo's outer step, which mixes in this stage's parameters (never a
    tentative step's)."""
    every = config.outer_every
    due = outer is not None and step > 0 and step % every == 0 and outer.synced_for < step
    return step < num_steps and not due
