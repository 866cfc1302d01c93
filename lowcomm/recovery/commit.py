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
import time
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
        on_reply: Callable[[int], None] | None = None,
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
            if on_reply is not None:
                on_reply(res.revision)
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

    The copy is every parameter and every tensor of their optimizer state, in buffers reused from
    step to step and copied in one ``torch._foreach_copy_`` (measured here, CPU time over 300
    steps: 0.15-0.4 ms a step on the benchmark's block stages, on top of Adam's 0.6-0.8). ``undo``
    copies back into the same tensors and puts them back in the optimizer's state (an optimizer
    that replaced one gets the original back), drops state created by the step (a parameter's
    first step) and restores plain values (a step count kept as a number).
    """

    def __init__(self) -> None:
        self._live: list[torch.Tensor] = []  # the parameters, then their state tensors
        self._bufs: list[torch.Tensor] = []
        self._slots: list[tuple[torch.Tensor, str]] = []  # (parameter, key) of each state tensor
        self._plain: list[tuple[torch.Tensor, str, object]] = []
        self._had: list[torch.Tensor] = []  # the parameters that had state before ``apply``
        self._held: tuple[nn.Module, torch.optim.Optimizer] | None = None

    @property
    def pending(self) -> bool:
        """True between ``apply`` and ``commit`` / ``undo``."""
        return self._held is not None

    def apply(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        params = list(module.parameters())
        live: list[torch.Tensor] = list(params)
        self._slots, self._plain, self._had = [], [], []
        for p in params:
            state = optimizer.state.get(p)
            if not state:
                continue
            self._had.append(p)
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    live.append(v)
                    self._slots.append((p, k))
                else:
                    self._plain.append((p, k, v))
        if len(live) != len(self._bufs) or not all(map(_same, live, self._bufs)):
            self._bufs = [torch.empty_like(t) for t in live]
        with torch.no_grad():
            torch._foreach_copy_(self._bufs, live)
        self._live = live
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
            torch._foreach_copy_(self._live, self._bufs)
        params = list(module.parameters())
        had = {id(q) for q in self._had}
        for param in params:
            if id(param) not in had:
                optimizer.state.pop(param, None)
        for q in self._had:
            optimizer.state[q].clear()
        for (q, k), t in zip(self._slots, self._live[len(params) :], strict=True):
            optimizer.state[q][k] = t
        for q, k, v in self._plain:
            optimizer.state[q][k] = v
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
        self.seen: tuple[float, int] | None = None  # (when, revision) of the last vote's answer
        self.probes = 0  # the watcher's probes sent (the others skipped, ``needs_probe``)
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
            on_reply=self._reply,
            stage=self.stage,
        )
        return self.last

    def _reply(self, revision: int) -> None:
        self.seen = (time.monotonic(), revision)

    def needs_probe(self, want: int, now: float) -> bool:
        """False if a vote's answer showed the revision at ``want`` less than ``WATCH_S`` before
        ``now``: that answer is as fresh as a probe would be, so the watcher skips it."""
        seen = self.seen
        return seen is None or seen[1] != want or now - seen[0] >= WATCH_S

    def settle(self) -> None:
        """Waits until the vote started last (if any) has its verdict (whatever it is)."""
        if self.last is not None:
            self.last.wait()

    def start_watch(self, expected: Callable[[], int | None]) -> None:
        """Starts the watcher thread (until ``stop``): every ``WATCH_S`` it asks the master for its
        membership revision (unless a vote's answer just told it, ``needs_probe``); if it is not
        ``expected()`` (None: not watching), aborts the stage. A peer lost right after a vote
        closed is seen within two ``WATCH_S`` (a probe every ``WATCH_S`` saw it within one): in
        steady training a vote answers every step, and the probes it replaces cost the master a
        request each."""
        name = f"stage{self.stage}-watch"
        threading.Thread(target=self._watch, args=(expected,), name=name, daemon=True).start()

    def _watch(self, expected: Callable[[], int | None]) -> None:
        while not self.stop.wait(WATCH_S):
            want = expected()
            if want is None or self.abort.is_set() or not self.needs_probe(want, time.monotonic()):
                continue
            self.probes += 1
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
    """True if attempt ``step`` may run on a tentative step ``step - 1``: run-ahead is on, it is
    one of the ``num_steps``, it does not start with DiLoCo's outer step (which mixes in this
    stage's parameters, never a tentative step's), and committing ``step - 1`` neither writes a
    checkpoint nor refreshes the (de)embedding copies: those run once the verdict is read, after
    the attempt ahead returns, so a stage killed in that attempt would never write them and its
    replacement would restore an older state."""
    if not config.run_ahead or step >= num_steps or step % config.checkpoint_every == 0:
        return False
    rc = config.recovery
    if rc.checkfree_plus and step % rc.embedding_backup_every == 0:
        return False
    every = config.outer_every
    due = outer is not None and step > 0 and step % every == 0 and outer.synced_for < step
    return not due
