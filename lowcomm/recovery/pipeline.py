"""The multi-process pipeline runtime: one stage per peer, a commit vote per step, CheckFree recovery.

Layout (the ring of ``stages``): peer group ``i`` holds stage ``i``; stage 0 the (de)embedding,
which owns the data and the targets, block stages 1..N. A step is GPipe: stage 0 embeds every
micro-batch and sends it to the first block stage of that micro-batch's order
(``ordering.block_order``: with CheckFree+ the edge stages run swapped on odd micro-batches); each
block stage receives, runs and sends on; stage 0 receives the last block's output, computes the
loss and sends the gradient back the same way. Backward runs micro-batches in order, so every
parameter accumulates its gradient in the order the single-process simulator does, and a seeded run
here equals ``SimPipeline`` bit for bit. Why the ring layout: the data, the targets and the tied
ends stay on one peer, so only activations and gradients cross the network.

Every stage, in lockstep (each numbered item is a phase every peer calls in the same order):

1. *Attempt* step t (``_attempt``): gradients computed, clipped and measured, nothing applied. A
   watcher thread polls the master's membership revision (``Communicator.live_revision``); if it
   moves (a peer died: evicted at once; a peer stopped: after the heartbeat timeout) it sets the
   stage's abort event, every wait gives up within ``_links.SLICE_S`` and ``StepAbortedError`` is
   latched (``last_abort``).
2. *Vote* (``Communicator.vote``, world-wide): the step commits only if every stage voted ok and
   the revision did not move, a decision every stage reads from the same answer. Meanwhile a stage
   that voted ok applies t tentatively and attempts t + 1 (``commit``: undone bit for bit unless t
   commits). On commit each stage records the gradient norm, checkpoints every ``checkpoint_every``
   steps, and stage 0 refreshes the CheckFree+ (de)embedding copies; otherwise nothing stays applied.
3. *Recovery* (``_recover``): the lost stages are those without a peer in the vote's world. The
   survivors admit replacements (``are_peers_pending`` / ``update_topology``, the ordinary join
   path: a replacement is a new ``Communicator`` of the lost stage's peer group) until every stage
   has a peer; the oldest peer sends each replacement a header (step, epoch, lost stages); every
   peer plans the same recovery from it (``rules.plan_recovery``); sources send their state and
   gradient norms, each replacement rebuilds (``rules.rebuild``, or its newest checkpoint from the
   ``StageStore``) and reports it; a second vote closes the recovery (a failure in it starts the
   recovery again, the failed rebuilds still lost). Then step t is retried. With
   ``on_loss="rollback"`` (the checkpoint baseline) every stage instead restores the newest
   checkpoint step all stages hold (``_roll_back``) and the steps since are redone.

Messages carry ``(epoch, step, micro_batch)``; the epoch counts votes, so nothing from an aborted
attempt is ever used (``_links``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from lowcomm.comm import CommError, Communicator, VoteResult
from lowcomm.faults import FaultInjector
from lowcomm.recovery._links import BWD, FWD, Links, ctrl_tag
from lowcomm.recovery.commit import Ballot, TentativeStep, Votes, may_run_ahead
from lowcomm.recovery.config import PipelineConfig
from lowcomm.recovery.errors import PipelineError, StepAbortedError
from lowcomm.recovery.ordering import block_order, swaps_enabled
from lowcomm.recovery.replicas import OuterState, Slot, assign_slots, missing_slots
from lowcomm.recovery.rules import (
    EMBEDDING_STAGE,
    GradNorm,
    Membership,
    Plan,
    RecoveryReport,
    Rule,
    Source,
    clip_and_measure,
    clone_state,
    lr_scale,
    plan_recovery,
    rebuild,
    state_hash,
)
from lowcomm.recovery.stages import BlockStage, EmbeddingStage, build_stages
from lowcomm.recovery.store import StageStore
from lowcomm.recovery.transfer import read_snapshots, rollback_checkpoint, served_state

__all__ = ["PipelineConfig", "StagePeer", "state_hash"]

logger = logging.getLogger(__name__)

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
OnEvent = Callable[[str, dict[str, Any]], None]
_MAX_RECOVERY_ROUNDS = 4
_MAX_RETRIES = 3  # attempts of one step voted down with no peer lost


class StagePeer:
    """One pipeline stage on one peer: the stage is ``comm.peer_group``.

    Args:
        comm: a ``Communicator`` not yet connected; ``run`` connects it (a replacement too: it
            joins through the ordinary admission).
        config: the pipeline's ``PipelineConfig`` (the same on every stage).
        store: where checkpoints go and come from (off every stage's own host).
        batches: ``batches(step) -> (x, y)``, the whole step's batch; stage 0 only.
        replacement: this peer replaces a lost stage: it builds nothing itself, it is rebuilt.
        faults: the injector hit at ``pipeline.micro_batch`` (tests).
        on_event: ``on_event(kind, info)`` for ``"committed"``, ``"aborted"``, ``"recovered"``,
            ``"done"``, ``"applied"`` / ``"rolled_back"`` (a step applied tentatively / undone,
            ``commit``); runs on the stage's thread (tests dump state from it).

    ``run(num_steps)`` blocks until the pipeline finished ``num_steps`` steps (or raises
    ``PipelineError``); not thread-safe (one caller).
    """

    def __init__(
        self,
        comm: Communicator,
        config: PipelineConfig,
        *,
        store: StageStore,
        batches: Batches | None = None,
        replacement: bool = False,
        faults: FaultInjector | None = None,
        on_event: OnEvent | None = None,
    ) -> None:
        self.comm = comm
        self.config = config
        self.stage = comm.peer_group
        self.num_blocks = config.stages.num_block_stages
        if not 0 <= self.stage <= self.num_blocks:
            raise ValueError(f"peer_group {self.stage} is no stage of 0..{self.num_blocks}")
        if self.stage == EMBEDDING_STAGE and batches is None:
            raise ValueError("stage 0 needs batches")
        self.store = store
        self.batches = batches
        self.replacement = replacement
        self.faults = faults
        self.on_event = on_event or (lambda kind, info: None)
        self.swap = swaps_enabled(self.num_blocks, checkfree_plus=config.recovery.checkfree_plus)
        embedding, blocks = build_stages(
            config.stages, generator=torch.Generator().manual_seed(config.seed)
        )
        self.module: nn.Module = embedding if self.stage == 0 else blocks[self.stage - 1]
        if replacement:
            with torch.no_grad():  # nothing of the lost stage may survive by accident
                for p in self.module.parameters():
                    p.fill_(float("nan"))
        self.optimizer = self._new_optimizer()
        self.replica = 0  # this peer's pipeline replica, known once ``run`` joined
        self.slots: dict[str, Slot] = {}  # peer id -> (stage, replica), see ``replicas``
        self.outer = self._new_outer() if config.num_replicas > 1 else None
        self.grad_norm: GradNorm | None = None
        self.rebuilt_at: int | None = None
        self.backup: dict[str, torch.Tensor] | None = None  # CheckFree+: the (de)embedding copy
        self.needs_rebuild = replacement  # until a recovery rebuilt it
        self.step = 0
        self.epoch = 0
        self.revision = -1
        self.last_abort: StepAbortedError | None = None
        self.last_loss = float("nan")
        self.reports: list[RecoveryReport] = []
        self.abort = threading.Event()
        self._watch_rev: int | None = None
        self._why = ""
        self._stop = threading.Event()
        self.links = Links(
            comm, abort=self.abort, reason=lambda: self._why, timeout_s=config.timeout_s
        )
        self.tentative = TentativeStep()  # step t applied while its vote is in flight (``run``)
        self._ballot: Ballot | None = None
        self.votes = Votes(
            comm, config.timeout_s, abort=self.abort, stop=self._stop, on_abort=self._set_abort
        )

    # ------------------------------------------------------------------ the loop
    def run(self, num_steps: int, *, connect_timeout_s: float = 60.0) -> None:
        """Joins, trains to ``num_steps`` steps (retrying aborted ones), and returns; step t + 1
        is attempted on a tentative step t while t's vote is in flight (``commit``)."""
        self.comm.connect(timeout_s=connect_timeout_s)
        self.votes.start_watch(lambda: self._watch_rev)
        try:
            if self.replacement:
                self._recover(None)
            else:
                self._gather()
                self._start()
            retries, ahead = 0, None  # ahead: attempt t + 1 (norm, loss), run before t's verdict
            while self.step < num_steps:
                norm, loss = ahead or (self._attempt(self.step), self.last_loss)
                ahead, nxt = None, self.step + 1
                self._ballot = self._vote_async(f"step{self.step}", norm is not None, ahead=True)
                if norm is not None and may_run_ahead(self.outer, nxt, num_steps, self.config):
                    self.tentative.apply(self.module, self.optimizer)
                    self._event("applied")
                    ahead = (self._attempt(nxt), self.last_loss)
                res, self._ballot = self._ballot.result(), None
                if res.ok and res.revision == self.revision:
                    self.last_loss, retries = loss, 0
                    self._commit(norm)
                    continue
                ahead = None
                self._discard(res)
                retries = retries + 1 if res.revision == self.revision else 0
                if retries > _MAX_RETRIES:  # every peer counts the same votes: all raise here
                    raise PipelineError(
                        f"stage {self.stage}: step {self.step} failed {retries} times with no "
                        f"peer lost (voted down by {res.failed}); see those peers' logs"
                    )
                self._recover(res)
            self.on_event("done", {"stage": self.stage, "step": self.step})
        finally:
            self._stop.set()
            self.votes.close()

    def _vote_async(self, name: str, ok: bool, *, ahead: bool = False) -> Ballot:
        key, self.epoch = f"{name}.e{self.epoch}", self.epoch + 1
        return self.votes.start(key, ok, revision=self.revision, abort=ahead)

    def _vote(self, name: str, ok: bool) -> VoteResult:
        return self._vote_async(name, ok).result()  # a phase: nothing runs ahead of it

    def _event(self, kind: str) -> None:
        self.on_event(kind, {"stage": self.stage, "replica": self.replica, "step": self.step})

    def _set_abort(self, why: str) -> None:
        self._why = why
        self.abort.set()

    def _arm(self, revision: int | None) -> None:
        self.abort.clear()
        self._why = ""
        self._watch_rev = revision
        ballot = self._ballot  # the vote of the step before, still in flight (``run``)
        if ballot is not None and ballot.bad():  # its abort landed before the clear
            self._set_abort(ballot.why)

    # ------------------------------------------------------------------ forming the pipeline
    def _peer_of(self) -> dict[int, str]:
        """Stage -> peer id of this peer's replica (as of the last ``_assign``)."""
        return {s: pid for pid, (s, r) in self.slots.items() if r == self.replica}

    def _slot_peer(self, slot: Slot) -> str:
        return next(pid for pid, held in self.slots.items() if held == slot)

    def _missing(self) -> set[Slot]:
        """The slots whose peer left the world (before the replacements are assigned)."""
        live = {pid: slot for pid, slot in self.slots.items() if pid in self.comm.peer_groups}
        return missing_slots(live, self.num_blocks + 1, self.config.num_replicas)

    def _assign(self) -> None:
        live = {pid: slot for pid, slot in self.slots.items() if pid in self.comm.peer_groups}
        self.slots = assign_slots(self.comm.peer_groups.items(), live, self.config.num_replicas)
        if self.comm.peer_id in self.slots:
            self.replica = self.slots[self.comm.peer_id][1]

    def _short(self) -> list[int]:
        g, want = list(self.comm.peer_groups.values()), self.config.num_replicas
        return [s for s in range(self.num_blocks + 1) if g.count(s) < want]

    def _gather(self) -> None:
        """Admits joiners until every slot has a peer (every peer calls it, in lockstep)."""
        self._arm(None)
        deadline = time.monotonic() + self.config.rejoin_timeout_s
        while self._short():
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"stages {self._short()} lack peers after "
                    f"{self.config.rejoin_timeout_s} s: start a replacement peer for each"
                )
            try:
                if self.comm.are_peers_pending(timeout_s=self.config.timeout_s):
                    self.comm.update_topology(timeout_s=self.config.timeout_s)
                else:
                    time.sleep(0.05)
            except CommError as exc:
                raise PipelineError(f"stage {self.stage}: admitting peers failed: {exc}") from exc
        self._assign()

    def _start(self) -> None:
        """Step 0 of a fresh pipeline: the first checkpoint, the first (de)embedding copies."""
        before = self.comm.revision
        self._arm(before)
        self._save_checkpoint(0)
        ok = True
        try:
            self._send_backups(set(self._holders()))
        except (StepAbortedError, CommError) as exc:
            logger.warning("stage %d: the first (de)embedding copies failed: %s", self.stage, exc)
            ok = False
        res = self._vote("start", ok)
        if not (res.ok and res.revision == before):
            raise PipelineError(f"stage {self.stage}: the pipeline lost a peer while starting")
        self.revision = res.revision

    # ------------------------------------------------------------------ one step
    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.module.parameters(), lr=self.config.lr, betas=(0.9, 0.999))

    def _new_outer(self) -> OuterState:
        c = self.config
        return OuterState(self.module, lr=c.outer_lr, momentum=c.outer_momentum)

    def _fault(self, step: int, mb: int, phase: str) -> None:
        if self.faults is not None:
            self.faults.hit("pipeline.micro_batch", stage=self.stage, step=step, mb=mb, phase=phase)

    def _shape(self) -> tuple[int, ...]:
        sc = self.config.stages
        return (self.config.micro_batch_size, sc.context, sc.width)

    def _attempt(self, step: int) -> GradNorm | None:
        """Forward and backward of step ``step``; the clipped gradients' norm, or None (aborted)."""
        self._arm(self.revision)
        scale = lr_scale(
            None if self.rebuilt_at is None else step - self.rebuilt_at, self.config.recovery
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale
        self.optimizer.zero_grad(set_to_none=True)
        try:
            every = self.config.outer_every
            if (
                self.outer is not None
                and step
                and step % every == 0
                and self.outer.synced_for < step
            ):
                # DiLoCo among this stage's replicas; all-or-nothing, never applied twice.
                self.outer.sync(self.module, self.comm, step=step, timeout_s=self.config.timeout_s)
            if self.stage == EMBEDDING_STAGE:
                self.last_loss = self._run_embedding(step)
            else:
                self._run_block(step)
            return clip_and_measure(self.module.parameters(), self.config.max_grad_norm)
        except (StepAbortedError, CommError) as exc:
            err = exc if isinstance(exc, StepAbortedError) else StepAbortedError(str(exc))
            self.last_abort = err
            self.optimizer.zero_grad(set_to_none=True)
            logger.warning("stage %d: step %d aborted: %s", self.stage, step, err)
            self.on_event(
                "aborted",
                {
                    "stage": self.stage,
                    "replica": self.replica,
                    "step": step,
                    "error": type(exc).__name__,
                    "reason": str(err),
                    "time": time.time(),
                },
            )
            return None

    def _order(self, mb: int) -> tuple[int, ...]:
        return block_order(mb, self.num_blocks, swap=self.swap)

    def _run_embedding(self, step: int) -> float:
        assert self.batches is not None and isinstance(self.module, EmbeddingStage)
        m = self.config.num_micro_batches
        peer = self._peer_of()
        x, y = self.batches(step)
        xs, ys = x.chunk(m), y.chunk(m)
        shape = self._shape()
        sends, embeds = [], []
        for mb in range(m):
            self._fault(step, mb, "forward")
            e = self.module.embed(xs[mb])
            embeds.append(e)
            sends.append(
                self.links.send(e, to=peer[self._order(mb)[0]], tag=FWD, key=(self.epoch, step, mb))
            )
        for handle in sends:
            self.links.wait(handle)
        total = 0.0
        for mb in range(m):
            self._fault(step, mb, "backward")
            last = peer[self._order(mb)[-1]]
            h = self.links.recv(shape, from_=last, tag=FWD, key=(self.epoch, step, mb))
            h.requires_grad_(True)
            loss = self.module.loss(h, ys[mb])
            (loss / m).backward()
            total += loss.item()
            assert h.grad is not None
            sends.append(self.links.send(h.grad, to=last, tag=BWD, key=(self.epoch, step, mb)))
        for mb in range(m):
            g = self.links.recv(
                shape, from_=peer[self._order(mb)[0]], tag=BWD, key=(self.epoch, step, mb)
            )
            embeds[mb].backward(g)
        for handle in sends:
            self.links.wait(handle)
        return total / m

    def _run_block(self, step: int) -> None:
        assert isinstance(self.module, BlockStage)
        m = self.config.num_micro_batches
        peer = self._peer_of()
        shape = self._shape()
        sends, saved = [], []
        for mb in range(m):
            order = self._order(mb)
            pos = order.index(self.stage)
            prev = order[pos - 1] if pos > 0 else EMBEDDING_STAGE
            nxt = order[pos + 1] if pos + 1 < len(order) else EMBEDDING_STAGE
            self._fault(step, mb, "forward")
            h = self.links.recv(shape, from_=peer[prev], tag=FWD, key=(self.epoch, step, mb))
            h.requires_grad_(True)
            out = self.module(h)
            sends.append(self.links.send(out, to=peer[nxt], tag=FWD, key=(self.epoch, step, mb)))
            saved.append((h, out, prev, nxt))
        for mb, (h, out, prev, nxt) in enumerate(saved):
            self._fault(step, mb, "backward")
            g = self.links.recv(shape, from_=peer[nxt], tag=BWD, key=(self.epoch, step, mb))
            out.backward(g)
            assert h.grad is not None
            sends.append(
                self.links.send(h.grad, to=peer[prev], tag=BWD, key=(self.epoch, step, mb))
            )
        for handle in sends:
            self.links.wait(handle)

    def _commit(self, norm: GradNorm | None) -> None:
        assert norm is not None
        self.tentative.commit(self.optimizer)
        self.grad_norm = norm
        self.step += 1
        done = self.step
        if done % self.config.checkpoint_every == 0:
            self._save_checkpoint(done)
        info: dict[str, Any] = {"stage": self.stage, "replica": self.replica, "step": done - 1}
        info.update(hash=state_hash(self.module.state_dict()), time=time.time())
        if self.stage == EMBEDDING_STAGE:
            info["loss"] = self.last_loss
        self.on_event("committed", info)
        rc = self.config.recovery
        if rc.checkfree_plus and done % rc.embedding_backup_every == 0:
            try:
                self._send_backups(set(self._holders()))
            except (StepAbortedError, CommError) as exc:
                # The next step's attempt sees the loss; the holders keep their older copy.
                logger.warning(
                    "stage %d: refreshing the (de)embedding copies failed: %s", self.stage, exc
                )

    def _discard(self, res: VoteResult) -> None:
        if self.tentative.pending:  # applied while the vote was in flight: put back bit for bit
            self.tentative.undo()
            self._event("rolled_back")
        # Every stage skips an epoch: no message of the attempt that ran ahead outranks a retry's.
        self.epoch += 1
        self.optimizer.zero_grad(set_to_none=True)
        why = f"failed {res.failed}, revision {self.revision} -> {res.revision}"
        logger.info("stage %d: step %d voted down (%s)", self.stage, self.step, why)

    def _save_checkpoint(self, done: int) -> None:
        self.store.save(
            self.stage,
            replica=self.replica,
            step=done,
            params=clone_state(self.module.state_dict()),
            optimizer=clone_state(self.optimizer.state_dict()),
        )

    def _ctrl(self) -> int:
        # The world view's revision (as of the last phase) is the same on every peer.
        return ctrl_tag(self.comm.revision)

    # ------------------------------------------------------------------ CheckFree+ copies
    def _holders(self) -> tuple[int, ...]:
        if not self.config.recovery.checkfree_plus:
            return ()
        return tuple(sorted({1, self.num_blocks}))

    def _send_backups(self, to: set[int]) -> None:
        """Stage 0 sends its parameters to the holders in ``to``; they keep them as the copy."""
        if not to:
            return
        peer = self._peer_of()
        if self.stage == EMBEDDING_STAGE:
            state = clone_state(self.module.state_dict())
            for h in sorted(to):
                self.links.send_obj(state, to=peer[h], tag=self._ctrl())
        elif self.stage in to:
            self.backup, _ = self.links.recv_obj(from_=peer[EMBEDDING_STAGE], tag=self._ctrl())

    # ------------------------------------------------------------------ recovery
    def _recover(self, res: VoteResult | None) -> None:
        """Rebuilds the lost stages (every peer calls it after a vote that did not commit; a
        replacement calls it first, with None) and leaves the pipeline ready to retry the step."""
        lost = None if res is None else self._missing()
        if res is not None and not lost:
            self.revision = res.revision
            return  # nothing was lost (a stage failed on its own): retry the step
        for _ in range(_MAX_RECOVERY_ROUNDS):
            self._gather()
            self._arm(self.comm.revision)
            ok = True
            try:
                lost = self._transfer(lost)
                self.needs_rebuild = False
            except (StepAbortedError, CommError, PipelineError) as exc:
                logger.warning("stage %d: recovery transfer failed: %s", self.stage, exc)
                ok = False
            watched = self.comm.revision
            res = self._vote(f"recovered{self.step}", ok)
            if res.ok and res.revision == watched:
                self.revision = res.revision
                return
            # Still lost: stages without a peer, and rebuilds that failed (their peer voted fail).
            # A replacement that failed before it learnt the lost stages knows itself.
            failed = {self.slots[p] for p in res.failed if p in self.slots}
            lost = self._missing() | (failed & set(lost or ()))
            if self.needs_rebuild:
                lost.add((self.stage, self.replica))
        raise PipelineError(
            f"stage {self.stage}: {_MAX_RECOVERY_ROUNDS} recoveries in a row failed at step "
            f"{self.step}; see the log for each"
        )

    def _transfer(self, lost: set[Slot] | None) -> set[Slot]:
        """One recovery's transfers; returns the lost slots (a replacement learns them here)."""
        coordinator = self.comm.peers[0]  # the oldest peer: always a survivor
        logger.debug(
            "stage %d: recovery at revision %d, lost %s", self.stage, self.comm.revision, lost
        )
        if self.comm.peer_id == coordinator:
            assert lost is not None
            header = {
                "step": self.step,
                "epoch": self.epoch,
                "lost": [list(slot) for slot in sorted(lost)],
                "slots": {pid: list(slot) for pid, slot in self.slots.items()},
            }
            for slot in sorted(lost):
                self.links.send_obj(header, to=self._slot_peer(slot), tag=self._ctrl())
        if self.needs_rebuild:
            header, _ = self.links.recv_obj(from_=coordinator, tag=self._ctrl())
            lost = {(int(s), int(r)) for s, r in header["lost"]}
            self.slots = {pid: (int(s), int(r)) for pid, (s, r) in header["slots"].items()}
            self.replica = self.slots[self.comm.peer_id][1]
            self.step, self.epoch = int(header["step"]), int(header["epoch"])
        if lost is None:  # a survivor always knows them; a replacement learnt them above
            raise PipelineError(f"stage {self.stage} does not know which stages were lost")
        if self.config.on_loss == "rollback":
            self._roll_back()
            return lost
        rc = self.config.recovery
        num_replicas = self.config.num_replicas
        for r in range(num_replicas):  # each replica's pipeline plans its own losses
            lost_r = {s for s, q in lost if q == r}
            if not lost_r:
                continue
            survivors = {
                s: tuple(q for q in range(num_replicas) if (s, q) not in lost) for s in lost_r
            }
            membership = Membership(
                num_block_stages=self.num_blocks,
                lost=frozenset(lost_r),
                replicas={s: qs for s, qs in survivors.items() if qs},
                embedding_backups=frozenset(h for h in self._holders() if h not in lost_r),
            )
            for plan in plan_recovery(membership, rc):
                target = (plan.stage, r)
                if target == (self.stage, self.replica):
                    self._rebuild(plan)
                    continue
                for source in plan.sources:
                    mine = (
                        (plan.stage, source.index)
                        if source.kind == "replica"
                        else (source.index, r)
                    )
                    if source.kind != "checkpoint" and mine == (self.stage, self.replica):
                        self._serve(source, to=self._slot_peer(target), target=plan.stage)
        # A replacement holder gets the current (de)embedding as part of joining.
        self._send_backups({h for h in self._holders() if (h, self.replica) in lost})
        return lost

    def _roll_back(self) -> None:
        """The checkpoint baseline: this stage (survivor or replacement) restores the newest
        checkpoint step every stage holds, as every other stage does; the steps since are redone."""
        start = time.perf_counter()
        step, ckpt = rollback_checkpoint(self.store, self.stage, self.num_blocks + 1)
        self.module.load_state_dict(ckpt["params"])
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.grad_norm, self.rebuilt_at, self.backup = None, None, None
        lost_steps, self.step = self.step - step, step
        source = (f"checkpoint:{self.stage}@{step}",)
        report = RecoveryReport(
            self.stage, Rule.ROLLBACK.value, source, (), ckpt["bytes"], time.perf_counter() - start
        )
        self.reports.append(report)
        info = {**asdict(report), "replica": self.replica, "step": step, "lost_steps": lost_steps}
        self.on_event("recovered", {**info, "hash": state_hash(self.module.state_dict())})

    def _serve(self, source: Source, *, to: str, target: int) -> None:
        if self.faults is not None:
            self.faults.hit("pipeline.serve", stage=self.stage, to_stage=target, step=self.step)
        obj = served_state(
            source,
            module=self.module,
            optimizer=self.optimizer,
            grad_norm=self.grad_norm,
            backup=self.backup,
            outer=self.outer,
            stage=self.stage,
        )
        self.links.send_obj(obj, to=to, tag=self._ctrl())

    def _rebuild(self, plan: Plan) -> None:
        start = time.perf_counter()
        snapshots, outer, received = read_snapshots(
            plan,
            store=self.store,
            stage=self.stage,
            replica=self.replica,
            receive=lambda slot: self.links.recv_obj(from_=self._slot_peer(slot), tag=self._ctrl()),
        )
        rebuilt = rebuild(plan, snapshots, self.config.recovery)
        self.module.load_state_dict(rebuilt.params)
        self.optimizer = self._new_optimizer()
        if rebuilt.optimizer is not None:
            self.optimizer.load_state_dict(rebuilt.optimizer)
        if self.config.num_replicas > 1:
            # A replica copy takes the survivor's outer state; any other rule restarts DiLoCo's
            # outer state from the rebuilt parameters.
            self.outer = self._new_outer()
            if outer is not None:
                self.outer.load(outer)
        self.grad_norm = None
        self.rebuilt_at = self.step if rebuilt.lr_boost else None
        if plan.rule is Rule.CHECKPOINT:
            self.backup = None
        report = RecoveryReport(
            stage=rebuilt.report.stage,
            rule=rebuilt.report.rule,
            sources=rebuilt.report.sources,
            weights=rebuilt.report.weights,
            bytes=rebuilt.report.bytes,
            seconds=time.perf_counter() - start,
        )
        self.reports.append(report)
        logger.info("stage %d rebuilt at step %d: %s", self.stage, self.step, report)
        self.on_event(
            "recovered",
            {
                **asdict(report),
                "replica": self.replica,
                "step": self.step,
                "received_bytes": received,
                "hash": state_hash(self.module.state_dict()),
            },
        )
