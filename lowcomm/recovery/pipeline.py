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
   the revision did not move, a decision every stage reads from the same answer. On commit each
   stage steps its optimizer, records the gradient norm, checkpoints every ``checkpoint_every``
   steps, and stage 0 refreshes the CheckFree+ (de)embedding copies on their schedule. Otherwise
   nothing was applied anywhere.
3. *Recovery* (``_recover``): the lost stages are those without a peer in the vote's world. The
   survivors admit replacements (``are_peers_pending`` / ``update_topology``, the ordinary join
   path: a replacement is a new ``Communicator`` of the lost stage's peer group) until every stage
   has a peer; the oldest peer sends each replacement a header (step, epoch, lost stages); every
   peer plans the same recovery from it (``rules.plan_recovery``); sources send their state and
   gradient norms, each replacement rebuilds (``rules.rebuild``, or its newest checkpoint from the
   ``StageStore``) and reports it; a second vote closes the recovery (a failure in it starts the
   recovery again, the failed rebuilds still lost). Then step t is retried.

Messages carry ``(epoch, step, micro_batch)``; the epoch counts votes, so nothing from an aborted
attempt is ever used (``_links``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowcomm.comm import CommError, Communicator, VoteResult
from lowcomm.faults import FaultInjector
from lowcomm.recovery._links import BWD, FWD, Links, ctrl_tag
from lowcomm.recovery.config import RecoveryConfig
from lowcomm.recovery.errors import PipelineError, StepAbortedError
from lowcomm.recovery.ordering import block_order, swaps_enabled
from lowcomm.recovery.rules import (
    EMBEDDING_STAGE,
    GradNorm,
    Membership,
    Plan,
    RecoveryReport,
    Rule,
    Source,
    StageSnapshot,
    clip_and_measure,
    clone_state,
    lr_scale,
    plan_recovery,
    rebuild,
)
from lowcomm.recovery.stages import BlockStage, EmbeddingStage, StageConfig, build_stages
from lowcomm.recovery.store import StageStore

__all__ = ["PipelineConfig", "StagePeer", "state_hash"]

logger = logging.getLogger(__name__)

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
OnEvent = Callable[[str, dict[str, Any]], None]
_WATCH_S = 0.1
_MAX_RECOVERY_ROUNDS = 4
_MAX_RETRIES = 3  # attempts of one step voted down with no peer lost


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """What every stage of one pipeline must agree on.

    Attributes:
        stages: the model's shape (``num_block_stages`` + 1 peers).
        num_micro_batches: micro-batches per step (GPipe); at most 4, since a stage's
            point-to-point pool has four threads and the ring layout's last send waits on stage 0.
        micro_batch_size: sequences per micro-batch.
        lr, max_grad_norm: Adam's rate (betas 0.9, 0.999, as the simulator) and the clip.
        checkpoint_every: each stage saves its state to the ``StageStore`` every this many steps
            (and at step 0); the fallback of the rules.
        recovery: the rules (``RecoveryConfig``).
        seed: the initialisation's seed (every stage draws the whole model and keeps its part,
            so the pipeline starts as ``SimPipeline`` does).
        timeout_s: the bound of every message and vote.
        rejoin_timeout_s: how long the survivors wait for replacements before ``PipelineError``.
    """

    stages: StageConfig
    num_micro_batches: int = 2
    micro_batch_size: int = 2
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    seed: int = 0
    timeout_s: float = 30.0
    rejoin_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.num_micro_batches <= 4:
            raise ValueError(
                f"PipelineConfig.num_micro_batches must be in 1..4, got {self.num_micro_batches}"
            )
        for name in ("micro_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PipelineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "timeout_s", "rejoin_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PipelineConfig.{name} must be > 0, got {getattr(self, name)}")


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """A short sha256 of a state dict's tensors, in key order (to compare stages across peers)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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
            ``"done"``; runs on the stage's thread (tests dump state from it).

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

    # ------------------------------------------------------------------ the loop
    def run(self, num_steps: int, *, connect_timeout_s: float = 60.0) -> None:
        """Joins, trains to ``num_steps`` steps (retrying aborted ones), and returns."""
        self.comm.connect(timeout_s=connect_timeout_s)
        watcher = threading.Thread(target=self._watch, name=f"stage{self.stage}-watch", daemon=True)
        watcher.start()
        try:
            if self.replacement:
                self._recover(None)
            else:
                self._gather()
                self._start()
            retries = 0
            while self.step < num_steps:
                norm = self._attempt(self.step)
                res = self._vote(f"step{self.step}", norm is not None)
                if res.ok and res.revision == self.revision:
                    self._commit(norm)
                    retries = 0
                    continue
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

    def _vote(self, name: str, ok: bool) -> VoteResult:
        try:
            # A stage that failed on its own votes at once, while the others may still wait out
            # a receive (``timeout_s``) and an eviction (the heartbeat timeout) before voting.
            wait_s = 2 * self.config.timeout_s + self.comm.heartbeat_timeout_s
            res = self.comm.vote(f"{name}.e{self.epoch}", ok, timeout_s=wait_s)
        except CommError as exc:
            raise PipelineError(f"stage {self.stage}: the vote on {name} failed: {exc}") from exc
        self.epoch += 1
        return res

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_S):
            expected = self._watch_rev
            if expected is None or self.abort.is_set():
                continue
            try:
                rev = self.comm.live_revision(timeout_s=2.0)
            except CommError as exc:
                logger.debug("stage %d: membership probe failed: %s", self.stage, exc)
                continue
            if rev != expected and self._watch_rev == expected:
                self._why = f"the membership moved (revision {expected} -> {rev}): a peer was lost"
                self.abort.set()

    def _arm(self, revision: int | None) -> None:
        self.abort.clear()
        self._why = ""
        self._watch_rev = revision

    # ------------------------------------------------------------------ forming the pipeline
    def _peer_of(self) -> dict[int, str]:
        """Stage -> peer id in this peer's current view of the world (one peer per stage)."""
        out: dict[int, str] = {}
        for pid, group in self.comm.peer_groups.items():
            out.setdefault(group, pid)
        return out

    def _missing(self) -> set[int]:
        present = self._peer_of()
        return {s for s in range(self.num_blocks + 1) if s not in present}

    def _gather(self) -> None:
        """Admits joiners until every stage has a peer (every peer calls it, in lockstep)."""
        self._arm(None)
        deadline = time.monotonic() + self.config.rejoin_timeout_s
        while self._missing():
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"stages {sorted(self._missing())} have no peer after "
                    f"{self.config.rejoin_timeout_s} s: start a replacement peer for each"
                )
            try:
                if self.comm.are_peers_pending(timeout_s=self.config.timeout_s):
                    self.comm.update_topology(timeout_s=self.config.timeout_s)
                else:
                    time.sleep(0.05)
            except CommError as exc:
                raise PipelineError(f"stage {self.stage}: admitting peers failed: {exc}") from exc

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
        self.optimizer.step()
        self.grad_norm = norm
        self.step += 1
        done = self.step
        if done % self.config.checkpoint_every == 0:
            self._save_checkpoint(done)
        info = {
            "stage": self.stage,
            "step": done - 1,
            "hash": state_hash(self.module.state_dict()),
            "time": time.time(),
        }
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
        self.optimizer.zero_grad(set_to_none=True)
        logger.info(
            "stage %d: step %d voted down (failed %s, revision %d -> %d)",
            self.stage,
            self.step,
            res.failed,
            self.revision,
            res.revision,
        )

    def _save_checkpoint(self, done: int) -> None:
        self.store.save(
            self.stage,
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
            stage_of = {pid: s for s, pid in self._peer_of().items()}
            failed = {stage_of[p] for p in res.failed if p in stage_of}
            lost = self._missing() | (failed & set(lost or ()))
            if self.needs_rebuild:
                lost.add(self.stage)
        raise PipelineError(
            f"stage {self.stage}: {_MAX_RECOVERY_ROUNDS} recoveries in a row failed at step "
            f"{self.step}; see the log for each"
        )

    def _transfer(self, lost: set[int] | None) -> set[int]:
        """One recovery's transfers; returns the lost stages (a replacement learns them here)."""
        peer = self._peer_of()
        coordinator = self.comm.peers[0]  # the oldest peer: always a survivor
        logger.debug(
            "stage %d: recovery transfer at revision %d, lost %s, coordinator %s",
            self.stage,
            self.comm.revision,
            lost,
            coordinator,
        )
        me = self.comm.peer_id
        if me == coordinator:
            assert lost is not None
            header = {"step": self.step, "epoch": self.epoch, "lost": sorted(lost)}
            for s in sorted(lost):
                self.links.send_obj(header, to=peer[s], tag=self._ctrl())
        if self.needs_rebuild:
            header, _ = self.links.recv_obj(from_=coordinator, tag=self._ctrl())
            lost = set(header["lost"])
            self.step, self.epoch = int(header["step"]), int(header["epoch"])
        if lost is None:  # a survivor always knows them; a replacement learnt them above
            raise PipelineError(f"stage {self.stage} does not know which stages were lost")
        rc = self.config.recovery
        holders = frozenset(h for h in self._holders() if h not in lost)
        membership = Membership(
            num_block_stages=self.num_blocks,
            lost=frozenset(lost),
            embedding_backups=holders if rc.checkfree_plus else frozenset(),
        )
        for plan in plan_recovery(membership, rc):
            if plan.stage == self.stage:
                self._rebuild(plan, peer)
            else:
                for source in plan.sources:
                    if source.kind in ("neighbour", "backup") and source.index == self.stage:
                        self._serve(source, to=peer[plan.stage], target=plan.stage)
        # A replacement holder gets the current (de)embedding as part of joining.
        self._send_backups({h for h in self._holders() if h in lost})
        return lost

    def _serve(self, source: Source, *, to: str, target: int) -> None:
        if self.faults is not None:
            self.faults.hit("pipeline.serve", stage=self.stage, to_stage=target, step=self.step)
        if source.kind == "backup":
            if self.backup is None:
                raise PipelineError(f"stage {self.stage} holds no (de)embedding copy to serve")
            self.links.send_obj({"params": self.backup, "grad_norm": None}, to=to, tag=self._ctrl())
            return
        norm = (
            None
            if self.grad_norm is None
            else (self.grad_norm.before_clip, self.grad_norm.after_clip)
        )
        self.links.send_obj(
            {"params": clone_state(self.module.state_dict()), "grad_norm": norm},
            to=to,
            tag=self._ctrl(),
        )

    def _rebuild(self, plan: Plan, peer: dict[int, str]) -> None:
        start = time.perf_counter()
        snapshots: dict[Source, StageSnapshot] = {}
        received = 0
        for source in plan.sources:
            if source.kind == "checkpoint":
                ckpt = self.store.load(self.stage)
                if ckpt is None:
                    raise PipelineError(f"stage {self.stage} was lost and has no checkpoint")
                snapshots[source] = StageSnapshot(ckpt["params"], ckpt["optimizer"])
                continue
            obj, size = self.links.recv_obj(from_=peer[source.index], tag=self._ctrl())
            received += size
            norm = obj["grad_norm"]
            snapshots[source] = StageSnapshot(
                obj["params"], grad_norm=None if norm is None else GradNorm(*norm)
            )
        rebuilt = rebuild(plan, snapshots, self.config.recovery)
        self.module.load_state_dict(rebuilt.params)
        self.optimizer = self._new_optimizer()
        if rebuilt.optimizer is not None:
            self.optimizer.load_state_dict(rebuilt.optimizer)
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
                "step": self.step,
                "received_bytes": received,
                "hash": state_hash(self.module.state_dict()),
            },
        )
