"""``DiLoCo``: the one object a user adds to an ordinary PyTorch training loop.

    model = GPT(...)                                   # plain, or FSDP2-sharded inside a replica
    inner = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    comm = lowcomm.comm.Communicator(master_address, peer_group=0, token=...)
    comm.connect(timeout_s=60)
    trainer = DiLoCo(model, inner, comm, config=OuterConfig(method="async", sync_every=100))

    for x, y in loader:
        loss = model(x, y)
        loss.backward()
        trainer.step()           # inner AdamW step; every sync_every steps, the outer sync
    trainer.finish()             # applies the last in-flight outer step; model holds theta

Contract:
    * Every peer of a peer group builds ``DiLoCo`` with the same ``OuterConfig`` and a model of the
      same shapes, and calls ``step()`` once per inner step. The constructor blocks in a shared-state
      sync so that every peer (a late joiner too) starts from the same outer parameters, momentum
      and step counters before its first inner step; the model's parameters are overwritten.
    * ``step()`` runs ``inner_optimizer.step()`` and ``zero_grad()``, then, when due, the outer
      sync. It blocks only where the method must: synchronous DiLoCo waits for its all-reduce;
      async DiLoCo, CO2 and delayed Nesterov wait for the previous round's all-reduce, which has had
      a whole round of inner steps to finish; Streaming waits ``overlap_steps`` after each send.
    * The outer parameters and momentum live on ``config.outer_device`` (CPU by default, to spare
      GPU memory) as one flat fp32 buffer each, and are the shared state that joiners receive. The
      inner optimizer's moments stay local and are never averaged (DiLoCo's rule).
    * Under FSDP2 each peer holds one shard (``DTensor.to_local()``): make the local shard index
      the ``peer_group`` so that shard i of every replica reduces with shard i of the others.
    * Not thread-safe: call it from the training thread only.

Elastic membership: at each outer step, once nothing of ours is in flight, every peer asks
``are_peers_pending()`` (all get the same answer). If a peer waits, all of them drain the pipeline
(the in-flight all-reduce is applied, the current round is reduced synchronously rather than
overlapped, since a joiner cannot enter an all-reduce already running), call ``update_topology()``
and ``sync_shared_state()``; the joiner's constructor takes part in that sync (pass
``joining=True``: it then only receives). Nobody restarts and no outer step is lost. A peer that
leaves or dies simply stops taking part: the next all-reduce fails, is retried among the survivors,
and every later round averages over whoever is left.

Failures: a round whose all-reduce fails (a peer died, a timeout: any ``LowcommError``) is retried
among the survivors (``config.max_retries`` times, ``on_failure="retry"``); if it still fails, or
with ``on_failure="drop"``, the round is dropped: no outer step, and each peer keeps its local
progress, which the next round's pseudo-gradient carries (it is measured against the unchanged outer
parameters). Retrying first keeps the survivors' contributions in the round they belong to; dropping
is the bounded fallback so that training never stops on a broken round.

Layout of the package: the facade here; ``_layout`` (the flat parameter vector, FSDP2 shards),
``_outer_state`` (theta, momentum, the update rule, the shared-state sync), ``_collectives`` (the
all-reduces with retry and drop, DyLU's speed reduce), and one ``OuterLoop`` per method family
(``_sync``, ``_pipelined``, ``_streaming``), chosen once from ``config.method``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lowcomm.comm import StaleStateError
from lowcomm.diloco._collectives import Flight, PseudogradientReducer, Settled, SpeedControl
from lowcomm.diloco._layout import ParamLayout
from lowcomm.diloco._outer_comm import OuterComm
from lowcomm.diloco._outer_loop import OuterLoop
from lowcomm.diloco._outer_state import OuterState
from lowcomm.diloco._pipelined import PipelinedLoop
from lowcomm.diloco._stats import OuterStats
from lowcomm.diloco._streaming import StreamingLoop
from lowcomm.diloco._sync import SyncLoop
from lowcomm.diloco.config import OuterConfig
from lowcomm.errors import LowcommError
from lowcomm.faults import FaultInjector

__all__ = ["DiLoCo", "OuterStats"]

logger = logging.getLogger(__name__)

# The outer loop of each method (config.method), chosen once in the constructor.
_LOOPS: dict[str, type[SyncLoop] | type[PipelinedLoop] | type[StreamingLoop]] = {
    "diloco": SyncLoop,
    "async": PipelinedLoop,
    "co2": PipelinedLoop,
    "delayed_nesterov": PipelinedLoop,
    "streaming": StreamingLoop,
}


def _clone_tensors(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples cloned (the rest shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_clone_tensors(v) for v in obj)
    return obj


class DiLoCo:
    """Wraps a model and its inner optimizer; runs the DiLoCo-family outer loop over ``comm``.

    Args:
        model: the replica's model (plain ``nn.Module`` or FSDP2-sharded).
        inner_optimizer: the optimizer over ``model``'s parameters (AdamW in the papers).
        comm: a ``lowcomm.comm.Communicator`` (connected), or an ``OuterComm`` such as
            ``lowcomm.testing``'s ``SoloCommunicator`` / ``LocalGroup(n).communicator(i)``.
        config: the outer loop; the same on every peer.
        fragments: Streaming DiLoCo's fragments as lists of parameters (default: the parameters in
            order, cut into ``config.num_fragments`` groups of about equal size).
        initial_sync: run the shared-state sync in the constructor (leave True unless the caller
            runs it; see the class docstring).
        joining: this peer joins a run in progress: it only receives the shared state.
        faults: a fault injector; ``step()`` hits ``"trainer.inner_step"`` with ``step`` = the
            number of inner steps done before it (so ``where={"step": N}`` fires once N inner steps
            and any outer step they ended with are complete). None: no fault points.

    Raises:
        ValueError: the model has no trainable parameters, or the fragments do not cover them.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        comm: OuterComm,
        *,
        config: OuterConfig,
        fragments: Sequence[Sequence[nn.Parameter]] | None = None,
        initial_sync: bool = True,
        joining: bool = False,
        faults: FaultInjector | None = None,
    ) -> None:
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.comm = comm
        self.config = config
        self.stats = OuterStats()
        self._faults = faults
        if (unsafe := config.inner_optimizer_warning(inner_optimizer)) is not None:
            logger.warning("DiLoCo: %s", unsafe)
        if (stale := config.staleness_warning()) is not None:
            logger.warning("DiLoCo: %s", stale)
        loop_cls = _LOOPS[config.method]
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DiLoCo: the model has no trainable parameters")
        num_fragments = config.num_fragments if loop_cls.streams_fragments else None
        self._layout = ParamLayout(params, fragments, num_fragments=num_fragments)
        self._state = OuterState(
            comm,
            layout=self._layout,
            config=config,
            stats=self.stats,
            share_inner_steps=loop_cls.streams_fragments,
        )
        self._speed = SpeedControl(comm, config, self.stats)
        self._reducer = PseudogradientReducer(comm, config, self.stats, stamp=self._state.stamp)
        self._loop: OuterLoop = loop_cls(self._state, self._reducer, self._speed)
        if initial_sync:
            self._state.sync("receive_only" if joining else "enforce_popular")

    # ---------------------------------------------------------------- public API
    @property
    def outer_params(self) -> torch.Tensor:
        """The outer parameters theta, flat fp32 in this trainer's layout (read-only use)."""
        return self._state.theta

    @property
    def outer_momentum(self) -> torch.Tensor:
        return self._state.momentum

    @property
    def round_steps(self) -> int:
        """Inner steps taken since the last outer step (0 right after one; read-only)."""
        return self._state.round_steps

    @torch.no_grad()
    def copy_outer_to(self, model: nn.Module) -> None:
        """Copies theta into ``model``, another instance of the wrapped model's class (for eval).

        Plain (unsharded) models only; parameters are matched by name.
        """
        names = {id(p): n for n, p in self.model.named_parameters()}
        target = dict(model.named_parameters())
        for p, a, b in self._layout.slices():
            dst = target[names[id(p)]]
            dst.copy_(self._state.theta[a:b].view(dst.shape))

    def outer_hash(self) -> str:
        """A hash of the shared outer state (theta, momentum, counters); equal on in-sync peers."""
        h = hashlib.sha256()
        for t in self._state.shared_tensors().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def step(self) -> None:
        """One inner step (after ``loss.backward()``) and, when due, the outer sync. See module doc."""
        if self._faults is not None:
            self._faults.hit("trainer.inner_step", step=self.stats.inner_steps)
        t0 = time.perf_counter()
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.stats.inner_s += dt
        self.stats.inner_steps += 1
        self._state.round_steps += 1
        try:
            self._loop.after_inner_step()
        except StaleStateError as exc:
            self._resync(exc)

    def finish(self, *, timeout_s: float | None = None) -> None:
        """Waits for and applies whatever is in flight, then loads theta into the model.

        Call it at the end of training (every peer, same point): afterwards the model holds the
        outer parameters, which are what should be evaluated (inner parameters evaluate worse).
        """
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        try:
            self._loop.drain(timeout_s=timeout_s)
        except StaleStateError as exc:
            self._resync(exc)
        if self._state.carry is not None:
            # A round dropped for good at the very end: apply its progress as a last outer step
            # would not be agreed by the peers; keep it out of theta and report it.
            logger.warning("finish: a dropped round's local progress is not in theta")
            self._state.carry = None
        self._layout.scatter(self._state.theta)

    def state_dict(self, *, timeout_s: float | None = None, clone: bool = True) -> dict[str, Any]:
        """Everything needed to resume this peer exactly: model, outer state, local state, inner
        optimizer.

        Blocks until the all-reduces in flight complete (at most ``timeout_s``), since a collective
        cannot be resumed: their averages are saved and applied on schedule after loading. A round
        that fails here is dropped as usual and its contribution saved to travel with the next one.
        ``clone=False`` returns references to the live tensors instead of copies (what a lazy
        checkpointer wants: it copies them itself before the next ``step()`` changes them).
        """
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        try:
            self._loop.settle(timeout_s=timeout_s)
        except StaleStateError as exc:
            self._resync(exc)

        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (t.clone() if clone else t)

        flights = {name: (c(f.buf), c(f.sent)) for name, f in self._loop.flights().items()}
        state, ef = self._state, self._reducer.error_feedback
        return {
            "config": self.config,
            "model": _clone_tensors(self.model.state_dict()) if clone else self.model.state_dict(),
            "outer": {k: c(v) for k, v in state.shared_tensors().items()},
            "offset": c(state.offset),
            "offset_momentum": c(state.offset_momentum),
            "error": None if ef is None else ef.state_dict(),
            "carry": c(state.carry),
            "flights": flights,
            "round_steps": state.round_steps,
            "local_steps": self._speed.local_steps,
            "last_speed": self._speed.last_speed,
            "inner_optimizer": _clone_tensors(self.inner_optimizer.state_dict())
            if clone
            else self.inner_optimizer.state_dict(),
        }

    def _resync(self, exc: StaleStateError) -> None:
        """An all-reduce was refused on every peer of the group because their outer states differ
        (outer step or shared-state revision): nothing was averaged. Every peer abandons what is
        in flight, the peers behind take the newest state (``receive_only``) while the others
        serve it, and every peer restarts its round from the agreed theta."""
        mine = self._state.stamp()
        behind = (
            exc.is_behind if exc.mine is not None else (StaleStateError.order(mine) < exc.newest())
        )
        logger.warning(
            "outer step %d: %s; this peer (at %s) is %s and resyncs its outer state",
            self.stats.outer_steps,
            exc,
            mine,
            "behind" if behind else "up to date",
        )
        for flight in self._loop.flights().values():
            if flight.handle is not None:
                # Refused or settled alike on every peer; either way it is discarded.
                with contextlib.suppress(LowcommError):
                    flight.handle.wait(timeout_s=None)
        self._loop.restore({})
        self._speed.wait()
        self._state.carry = None
        self._state.sync("receive_only" if behind else "enforce_popular")
        self.stats.stale_resyncs += 1

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restores ``state_dict()``'s output into this trainer, its model and its inner optimizer.

        The one rule that keeps a resumed peer from rolling the run back: a saved outer state is
        never loaded over a newer one received from the run (its outer step is below the one the
        last shared-state sync agreed on, e.g. a joiner's constructor received it). Then only the inner optimizer's moments are restored; the model is set
        to the current outer parameters and the saved local round (its in-flight averages, eager
        offset, dropped carry) is discarded, as it belongs to an outer step the run has left.

        Returns:
            True if the saved outer state was loaded, False if the newer current one was kept.

        Raises:
            ValueError: another ``OuterConfig``, or outer state of another layout.
        """
        if state["config"] != self.config:
            raise ValueError("DiLoCo.load_state_dict: the saved OuterConfig differs from this one")
        outer = state["outer"]
        for name, t in self._state.shared_tensors().items():
            if name == "counters" and name in outer and outer[name].numel() == 3:
                continue  # saved before the shared-state revision was a counter
            if name not in outer or outer[name].shape != t.shape:
                raise ValueError(
                    f"DiLoCo.load_state_dict: outer state {name!r} is missing or misshapen"
                )
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        mine = self._state
        saved_step = int(outer["counters"][0])
        if saved_step < mine.synced_outer_step:
            logger.info(
                "load_state_dict: kept the run's outer step %d over the checkpoint's %d",
                mine.synced_outer_step,
                saved_step,
            )
            self._layout.scatter(mine.theta)
            mine.round_steps = 0
            mine.carry = None
            self._loop.restore({})
            return False
        mine.load_shared(outer)
        for attr in ("offset", "offset_momentum"):
            local = getattr(mine, attr)
            if local is not None and state[attr] is not None:
                local.copy_(state[attr])
        ef = self._reducer.error_feedback
        if ef is not None and state["error"] is not None:
            ef.load_state_dict(state["error"])
        mine.carry = None if state["carry"] is None else state["carry"].clone()
        mine.round_steps = int(state["round_steps"])
        self._speed.local_steps = int(state["local_steps"])
        self._speed.last_speed = float(state["last_speed"])
        self._loop.restore(
            {
                name: Flight(Settled(), buf.clone(), sent.clone())
                for name, (buf, sent) in state["flights"].items()
            }
        )
        if "model" in state:
            self.model.load_state_dict(state["model"])
        return True

    def sync_with_run(self, *, joining: bool) -> bool:
        """The constructor's shared-state sync, run later (after ``load_state_dict``): every peer
        of the group calls it at the same point (a joiner when the running peers admit it).

        If the run's outer state equals this peer's (a whole run restarted from one checkpoint),
        the local round (model, eager offset, in-flight averages, round position) is kept, so the
        resume is exact; otherwise the run's current outer state is taken and the local round
        restarts from it, never the other way round. Blocks up to ``config.timeout_s``.

        Returns:
            True if this peer's outer state changed (the run had moved on).
        """
        # Whether the values changed comes from what the sync fetched (``OuterState.sync``): no
        # hash of theta and momentum before and after, no copy of the local parameters (at 100M
        # parameters those were 1.6 GB of sha256 and 1.2 GB of copies, 40% of a resume).
        if not self._state.sync("receive_only" if joining else "enforce_popular", keep_round=True):
            return False
        self._state.carry = None
        self._loop.restore({})
        return True
