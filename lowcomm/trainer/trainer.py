"""``Trainer``: an outer loop (``DiLoCo``) with lazy checkpointing, restore and rejoin built in.

    run = lowcomm.init(min_replicas=2)                 # or a connected Communicator
    model = fully_shard(MyModel())
    inner = torch.optim.AdamW(model.parameters(), lr=3e-4)
    trainer = lowcomm.Trainer(
        model, inner, run,
        outer=OuterConfig(method="diloco", sync_every=100),
        checkpoint=CheckpointConfig(levels=("host://", "/ckpt/run1")),
        checkpoint_every=100,
        stateful={"data": loader},                     # anything with state_dict/load_state_dict
    )                                                  # restores, then takes the run's outer state
    for x, y in loader:
        loss_fn(model(x), y).backward()
        trainer.step()
    trainer.finish()

Contract:
    * The constructor restores this replica's newest checkpoint (this rank's shard: model, inner
      optimizer with its moments, outer state, RNG, step and every ``stateful`` object) when there
      is one, then runs the shared-state sync with the run. A replica admitted into a running run
      (``joining``) only receives: it takes the run's *current* outer state and never rolls the run
      back (``DiLoCo.load_state_dict`` holds that rule, ``DiLoCo.sync_with_run`` the order).
      FSDP2/DTensor state is restored in place into the live model and optimizer (a fresh
      optimizer's state is created first with a zero-learning-rate step), nothing to prime.
    * ``step()`` (after ``loss.backward()``) waits until the last checkpoint's copy is done
      (``wait_until_safe_to_mutate``), runs the inner step and, when due, the outer sync, then,
      every ``checkpoint_every`` inner steps (or ``checkpoint_every_outer`` outer steps), starts a
      lazy checkpoint: it references the tensors, which the copier copies while the next
      forward/backward runs; ``step`` returns at once.
    * ``finish()`` ends training (applies what is in flight, then ``close()``); ``save()`` then
      ``close()`` leaves a run mid-way with what is in flight in the checkpoint.
    * A checkpoint taken while an all-reduce is in flight (pipelined methods) waits for it
      (``DiLoCo.state_dict``): with ``method="async"`` pick ``checkpoint_every`` a multiple of
      ``sync_every`` if that wait matters.
    * Training thread only; every rank of a replica calls the same methods at the same steps.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from lowcomm.checkpoint import CheckpointConfig, Checkpointer, NoCheckpointError
from lowcomm.diloco import DiLoCo, OuterComm, OuterConfig
from lowcomm.faults import FaultInjector

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class _Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def _comm_of(run_or_comm: Any) -> OuterComm:
    comm = getattr(run_or_comm, "comm", None)
    if comm is not None:
        return comm
    if not hasattr(run_or_comm, "all_reduce_async"):
        raise ValueError(
            "Trainer: run_or_comm must be lowcomm.init()'s Run or a connected communicator, "
            f"got {type(run_or_comm).__name__}"
        )
    return run_or_comm


def rng_state() -> dict[str, Any]:
    """Every random generator a training script draws from: torch (CPU, CUDA), Python, numpy."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        out["numpy"] = numpy.random.get_state()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        numpy.random.set_state(state["numpy"])


def _has_dtensor(optimizer: torch.optim.Optimizer) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # imported by any DTensor's owner
    dtensor = getattr(module, "DTensor", None) if module is not None else None
    return dtensor is not None and any(
        isinstance(p, dtensor) for g in optimizer.param_groups for p in g["params"]
    )


@torch.no_grad()
def prime_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create a fresh optimizer's state (moments, step counters) so a checkpoint can be restored
    into it in place: one step on zero gradients with every learning rate at 0, as DCP does.

    Parameters are unchanged (lr 0 scales both the update and decoupled weight decay); only
    parameters without state are touched, and their gradients are reset to None afterwards.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p not in optimizer.state]
    if not params:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if not isinstance(g["lr"], torch.Tensor) else torch.zeros_like(g["lr"])
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        for p in params:
            p.grad = None


class Trainer:
    """An outer loop over ``run_or_comm`` that checkpoints, restores and rejoins by itself.

    Args:
        model: the replica's model (plain or FSDP2-sharded).
        inner_optimizer: the optimizer over ``model``'s parameters.
        run_or_comm: ``lowcomm.init()``'s ``Run`` (its ``.comm`` is used), or a connected
            ``lowcomm.comm.Communicator`` / any ``OuterComm``.
        outer: the outer loop's configuration, the same on every peer.
        checkpoint: a ``CheckpointConfig`` (the Trainer builds and closes its ``Checkpointer``),
            a ``Checkpointer`` (the caller's; not closed by ``finish``), or None: no checkpoints.
        checkpoint_every: inner steps between checkpoints (needs ``checkpoint``).
        checkpoint_every_outer: or outer steps between checkpoints, each taken in the ``step()``
            that applied the outer step (``outer_step`` a multiple of it). Outer steps are what a
            volunteer counts; with the pipelined methods they do not fall on multiples of
            ``sync_every`` inner steps, and a round dropped for a failure has none.
        stateful: named objects with ``state_dict()``/``load_state_dict()`` saved and restored with
            the rest (a ``torchdata`` ``StatefulDataLoader``, a learning-rate scheduler).
        faults: fault injector handed to ``DiLoCo`` (``"trainer.inner_step"``) and, when the
            Trainer builds it, the ``Checkpointer``.
        joining: this replica was admitted into a running run and only receives the outer state
            (None: the run's ``joining`` attribute, else False).
        restore: restore the newest checkpoint on start (default True).

    Raises:
        ValueError: bad arguments (each names the problem).
        CheckpointError: a checkpoint exists but none could be restored (the message lists why).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        run_or_comm: Any,
        *,
        outer: OuterConfig,
        checkpoint: CheckpointConfig | Checkpointer | None = None,
        checkpoint_every: int | None = None,
        checkpoint_every_outer: int | None = None,
        stateful: Mapping[str, _Stateful] | None = None,
        faults: FaultInjector | None = None,
        joining: bool | None = None,
        restore: bool = True,
    ) -> None:
        for name, every in (
            ("checkpoint_every", checkpoint_every),
            ("checkpoint_every_outer", checkpoint_every_outer),
        ):
            if every is not None and every < 1:
                raise ValueError(f"Trainer: {name} must be >= 1, got {every}")
            if every is not None and checkpoint is None:
                raise ValueError(f"Trainer: {name} needs checkpoint=CheckpointConfig(...)")
        if checkpoint_every is not None and checkpoint_every_outer is not None:
            raise ValueError("Trainer: give checkpoint_every or checkpoint_every_outer, not both")
        for name, obj in (stateful or {}).items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise ValueError(
                    f"Trainer: stateful[{name!r}] has no state_dict()/load_state_dict()"
                )
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.comm = _comm_of(run_or_comm)
        self.stateful = dict(stateful or {})
        self.checkpoint_every = checkpoint_every
        self.checkpoint_every_outer = checkpoint_every_outer
        if joining is None:
            joining = bool(getattr(run_or_comm, "joining", False))
        self.joining = joining
        self._owns_checkpointer = isinstance(checkpoint, CheckpointConfig)
        self.checkpointer: Checkpointer | None = (
            Checkpointer(checkpoint, faults=faults)
            if isinstance(checkpoint, CheckpointConfig)
            else checkpoint
        )
        self.diloco = DiLoCo(
            model, inner_optimizer, self.comm, config=outer, initial_sync=False, faults=faults
        )
        self.inner_step = 0
        self._saved_at: float | None = None  # when the last save started (its copy's wait)
        self._warned_interval = False
        self.resumed_from: int | None = None
        self.last_saved: int | None = None
        if restore and self.checkpointer is not None and self.checkpointer.checkpoints():
            self._restore()
        self.took_run_state = self.diloco.sync_with_run(joining=joining)
        if self.took_run_state and self.resumed_from is not None:
            logger.info(
                "resumed inner step %d from the checkpoint; took the run's outer step %d",
                self.inner_step,
                self.outer_step,
            )

    # ---- what the training loop reads -----------------------------------------------------------

    @property
    def outer_step(self) -> int:
        """Outer steps applied so far in the run (shared by every peer)."""
        return self.diloco.stats.outer_steps

    @property
    def stats(self) -> Any:
        return self.diloco.stats

    # ---- the training loop's calls --------------------------------------------------------------

    def step(self) -> None:
        """One inner step (after ``loss.backward()``), the outer sync when due, then a lazy
        checkpoint when due. Blocks only where the outer loop must, or if the last checkpoint's
        copy is still running (then ``stats`` shows it as the wait before the step)."""
        if self.checkpointer is not None:
            t0 = time.monotonic()
            self.checkpointer.wait_until_safe_to_mutate()
            self._warn_if_interval_too_short(t0, time.monotonic() - t0)
        before = self.outer_step
        self.diloco.step()
        self.inner_step += 1
        if self._checkpoint_due(outer_stepped=self.outer_step != before):
            self.save()

    def _warn_if_interval_too_short(self, started: float, waited_s: float) -> None:
        """Say once when the last checkpoint's copy outlasted the steps since it: the interval is
        shorter than the state takes to copy (over the device-to-host link on a GPU, or the
        copy's share of the cores on a CPU), and every checkpoint now stalls training."""
        if self._saved_at is None or self._warned_interval or waited_s < 0.01:
            return
        since_save = started - self._saved_at + waited_s
        if waited_s > 0.1 * since_save:
            self._warned_interval = True
            logger.warning(
                "checkpoint interval too short: training waited %.3f s for the last checkpoint's "
                "copy, %.0f%% of the %.3f s since it started; raise checkpoint_every (now %s) so "
                "the copy fits in the steps between checkpoints",
                waited_s,
                100 * waited_s / since_save,
                since_save,
                self.checkpoint_every or f"{self.checkpoint_every_outer} outer steps",
            )
        self._saved_at = None

    def _checkpoint_due(self, *, outer_stepped: bool) -> bool:
        if self.checkpoint_every is not None:
            return self.inner_step % self.checkpoint_every == 0
        if self.checkpoint_every_outer is not None:
            return outer_stepped and self.outer_step % self.checkpoint_every_outer == 0
        return False

    def save(self) -> None:
        """Start a lazy checkpoint of everything at the current inner step (returns at once).

        Waits for the all-reduces in flight (``DiLoCo.state_dict``), so their averages are in the
        checkpoint: call it before leaving a run mid-way, then ``close()``. A second call at the
        same inner step is skipped (``step()`` may have saved it already, and nothing changed).
        """
        if self.checkpointer is None:
            raise ValueError("Trainer.save: no checkpoint= was given")
        if self.last_saved == self.inner_step:
            return
        self.checkpointer.save(
            self.inner_step,
            self.state_dict(),
            metadata={"inner_step": self.inner_step, "outer_step": self.outer_step},
        )
        self.last_saved = self.inner_step
        self._saved_at = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        """References to everything a resume needs (no copies): valid until the next ``step()``."""
        outer = self.diloco.state_dict(clone=False)
        return {
            "step": self.inner_step,
            "diloco": outer,
            "rng": rng_state(),
            "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
        }

    def finish(self, *, timeout_s: float = 600.0) -> None:
        """Applies what is in flight (the model then holds the outer parameters) and waits for the
        checkpoints to be durable; closes the Checkpointer the Trainer built."""
        if self.checkpointer is not None:
            # Applying the rounds in flight changes the model: the last save must have its bytes.
            self.checkpointer.wait_until_safe_to_mutate()
        self.diloco.finish()
        self.close(timeout_s=timeout_s)

    def close(self, *, timeout_s: float = 600.0) -> None:
        """Waits for the checkpoints in progress to be durable and closes the Checkpointer the
        Trainer built (a caller's is only waited for). Unlike ``finish`` it applies nothing in
        flight: for leaving a run mid-way after ``save()``, whose checkpoint holds that state.
        Idempotent; the Trainer cannot save afterwards."""
        if self.checkpointer is not None:
            if self._owns_checkpointer:
                self.checkpointer.close(timeout_s)
            else:
                self.checkpointer.wait(timeout_s)

    # ---- the run's outer state, on its own ------------------------------------------------------

    def outer_state(self) -> dict[str, torch.Tensor]:
        """A copy of the run's outer state as this replica holds it: ``theta`` and ``momentum``
        (flat fp32, this replica's layout) and ``outer_step`` (a one-element int64 tensor).

        For keeping the run alive beyond its peers (``lowcomm.launch.volunteer.RunArchive``):
        every peer holds the same values, so any one of them can export it. Does not wait for the
        all-reduces in flight (their average is not in it yet).
        """
        return {
            "theta": self.diloco.outer_params.detach().clone(),
            "momentum": self.diloco.outer_momentum.detach().clone(),
            "outer_step": torch.tensor([self.outer_step], dtype=torch.int64),
        }

    def load_outer_state(self, outer: Mapping[str, torch.Tensor]) -> None:
        """Replaces the outer state with ``outer`` (``outer_state()``'s output, from an earlier
        run of the same model) and loads theta into the model; the inner optimizer, inner step
        and ``stateful`` objects are kept. Rounds in flight and the current round are dropped.

        Only when this replica is alone in the run (it would otherwise disagree with its peers),
        right after construction; plain (unsharded) models only.

        Raises:
            ValueError: ``outer`` has another number of parameters (another model).
        """
        state = self.diloco.state_dict()
        if outer["theta"].shape != state["outer"]["theta"].shape:
            raise ValueError(
                f"Trainer.load_outer_state: the saved outer state has {outer['theta'].numel()} "
                f"parameters, this model {state['outer']['theta'].numel()}: not the same model"
            )
        state["outer"]["theta"] = outer["theta"]
        state["outer"]["momentum"] = outer["momentum"]
        counters = state["outer"]["counters"].clone()
        counters[0] = int(outer["outer_step"][0])
        state["outer"]["counters"] = counters
        state.update(flights={}, carry=None, round_steps=0)
        self.diloco.load_state_dict(state)
        self.diloco.copy_outer_to(self.model)

    # ---- restore --------------------------------------------------------------------------------

    def _restore(self) -> None:
        assert self.checkpointer is not None
        if _has_dtensor(self.inner_optimizer):
            # FSDP2: the moments must come back as DTensors, so restore into primed ones. Plain
            # tensors need no priming (a full optimizer step's arithmetic: 30% of a 100M
            # resume here): the checkpoint's moments are read into fresh tensors that
            # ``load_state_dict`` adopts without a copy.
            prime_optimizer(self.inner_optimizer)
        template = self.state_dict()
        try:
            state = self.checkpointer.restore(into=template)
        except NoCheckpointError as e:
            if "/step: in the template but not in the checkpoint" in str(e):
                # Written by the former launch.volunteer.VolunteerTrainer (top-level "model",
                # "diloco", "stateful", "inner_step"): say so instead of a key mismatch.
                raise NoCheckpointError(
                    f"the checkpoints at {self.checkpointer.config.levels} were written by an "
                    "older lowcomm (the volunteer trainer's layout) and cannot be resumed by "
                    "Trainer: start with a new checkpoint directory, or keep the model with "
                    "`lowcomm checkpoint export` first"
                ) from e
            raise
        self.diloco.load_state_dict(state["diloco"])
        set_rng_state(state["rng"])
        for name, obj in self.stateful.items():
            if name not in state["stateful"]:
                raise ValueError(f"Trainer: the checkpoint has no state for stateful[{name!r}]")
            obj.load_state_dict(state["stateful"][name])
        self.inner_step = int(state["step"])
        self.resumed_from = self.inner_step
        # The fault point's context (``step``) counts from the resumed step, as the Trainer does.
        self.diloco.stats.inner_steps = self.inner_step
        report = self.checkpointer.last_restore
        logger.info(
            "restored inner step %d (outer step %d) from the %s level",
            self.inner_step,
            self.outer_step,
            report.level if report else "?",
        )
