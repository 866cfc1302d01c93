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

Failures: a round whose all-reduce fails (a peer died, a timeout) is retried among the survivors
(``config.max_retries`` times, ``on_failure="retry"``); if it still fails, or with
``on_failure="drop"``, the round is dropped: no outer step, and each peer keeps its local progress,
which the next round's pseudo-gradient carries (it is measured against the unchanged outer
parameters). Retrying first keeps the survivors' contributions in the round they belong to; dropping
is the bounded fallback so that training never stops on a broken round.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowcomm.diloco._rules import (
    co2_step,
    delayed_nesterov_step,
    dynamic_local_steps,
    nesterov_step,
    streaming_merge,
)
from lowcomm.diloco._outer_comm import AllReduceHandle, OuterComm
from lowcomm.diloco.config import OuterConfig
from lowcomm.errors import LowcommError

__all__ = ["DiLoCo", "OuterStats"]

logger = logging.getLogger(__name__)

# Tags keep the concurrent all-reduces of one peer apart (several may be in flight).
_TAG_DELTA = 1
_TAG_CONTROL = 2
_TAG_FRAGMENT = 16  # + fragment index


@dataclass
class OuterStats:
    """Counters a trainer exposes for progress lines and benchmarks (read from the training thread)."""

    inner_steps: int = 0
    outer_steps: int = 0
    dropped_rounds: int = 0
    retried_rounds: int = 0
    joins: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    comm_wait_s: float = 0.0  # time step() spent blocked on the network
    inner_s: float = 0.0  # time step() spent in the inner optimizer


class _State:
    """Fallback shared-state container with the fields ``lowcomm.comm.SharedState`` has."""

    def __init__(self, tensors: dict[str, torch.Tensor], revision: int) -> None:
        self.tensors = tensors
        self.revision = revision


def _make_shared_state(tensors: dict[str, torch.Tensor], revision: int) -> Any:
    try:
        cls = getattr(importlib.import_module("lowcomm.comm"), "SharedState", None)
    except ImportError:
        cls = None
    if cls is None:
        return _State(tensors, revision)
    return cls(tensors=tensors, revision=revision)


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds for parameter ``p``: its shard under FSDP2, else its data."""
    to_local = getattr(p, "to_local", None)
    if to_local is not None:
        return to_local()
    return p.data


class _Ready:
    """A handle whose all-reduce has completed (restored from a checkpoint, or settled)."""

    def wait(self, *, timeout_s: float | None = None) -> None:
        return None


class _InFlight:
    def __init__(
        self, handle: AllReduceHandle | None, buf: torch.Tensor, sent: torch.Tensor
    ) -> None:
        self.handle = handle
        self.buf = buf  # receives the average
        self.sent = sent  # this peer's own contribution (kept for eager, retries and drops)


class DiLoCo:
    """Wraps a model and its inner optimizer; runs the DiLoCo-family outer loop over ``comm``.

    Args:
        model: the replica's model (plain ``nn.Module`` or FSDP2-sharded).
        inner_optimizer: the optimizer over ``model``'s parameters (AdamW in the papers).
        comm: a ``lowcomm.comm.Communicator`` (connected), or an ``OuterComm`` such as
            ``SoloCommunicator`` / ``LocalGroup(n).communicator(i)``.
        config: the outer loop; the same on every peer.
        fragments: Streaming DiLoCo's fragments as lists of parameters (default: the parameters in
            order, cut into ``config.num_fragments`` groups of about equal size).
        initial_sync: run the shared-state sync in the constructor (leave True unless the caller
            runs it; see the class docstring).
        joining: this peer joins a run in progress: it only receives the shared state.

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
    ) -> None:
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.comm = comm
        self.config = config
        self.stats = OuterStats()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DiLoCo: the model has no trainable parameters")
        self._fragment_ranges, self._params = self._layout(params, fragments)
        self._numels = [_local(p).numel() for p in self._params]
        self._offsets = [0]
        for n in self._numels:
            self._offsets.append(self._offsets[-1] + n)
        numel = self._offsets[-1]
        dev = torch.device(config.outer_device)
        self._theta = torch.zeros(numel, dtype=torch.float32, device=dev)
        self._momentum = torch.zeros_like(self._theta)
        self._gather(self._theta)
        # delayed Nesterov's buffer; eager updates' local offset and its momentum (local state).
        self._dn_buffer = (
            torch.zeros_like(self._theta) if config.method == "delayed_nesterov" else None
        )
        self._offset: torch.Tensor | None = None
        self._offset_momentum: torch.Tensor | None = None
        if config.eager:
            self._offset = torch.zeros_like(self._theta)
            self._offset_momentum = torch.zeros_like(self._theta)
        self._dn_count = 0
        self._round_steps = 0
        self._local_steps = config.sync_every
        self._in_flight: _InFlight | None = None
        self._fragment_flight: dict[int, _InFlight] = {}
        self._carry: torch.Tensor | None = None  # a dropped round's progress, sent with the next
        self._control: tuple[AllReduceHandle, torch.Tensor] | None = None
        # DyLU's speed: wall time of the round's inner steps (forward, backward and optimizer,
        # everything between outer steps) minus the time step() spent blocked on the network.
        self._round_start = time.perf_counter()
        self._round_wait_start = 0.0
        self._last_speed = 0.0
        self._codec: Any = None
        self._quantization: Any = None if config.quantization == "none" else config.quantization
        self._ef: Any = None
        if config.quantization == "topk":
            from lowcomm.compression import ErrorFeedback, get_codec

            # Top-k drops most of each pseudo-gradient: error feedback re-sends what was left
            # out in later rounds (mandatory: ALGORITHMS.md section 6). It covers this peer's own
            # compression; the ring re-sparsifies partial sums with the same codec.
            self._codec = get_codec("topk", fraction=config.topk_fraction)
            self._ef = ErrorFeedback(self._codec)
            self._quantization = self._codec
        if initial_sync:
            self._sync_state("receive_only" if joining else "enforce_popular")

    # ---------------------------------------------------------------- layout and copies
    def _layout(
        self, params: list[nn.Parameter], fragments: Sequence[Sequence[nn.Parameter]] | None
    ) -> tuple[list[tuple[int, int]], list[nn.Parameter]]:
        """Orders the parameters fragment by fragment so that each fragment is one flat slice."""
        num = self.config.num_fragments if self.config.method == "streaming" else 1
        if fragments is None:
            total = sum(_local(p).numel() for p in params)
            groups: list[list[nn.Parameter]] = [[] for _ in range(num)]
            seen = 0
            for p in params:
                groups[min(num - 1, seen * num // total)].append(p)
                seen += _local(p).numel()
        else:
            groups = [list(g) for g in fragments]
            if self.config.method == "streaming" and len(groups) != num:
                raise ValueError(f"got {len(groups)} fragments, config.num_fragments is {num}")
            ids = sorted(id(p) for g in groups for p in g)
            if ids != sorted(id(p) for p in params):
                raise ValueError("fragments must hold every trainable parameter exactly once")
        ordered: list[nn.Parameter] = []
        ranges: list[tuple[int, int]] = []
        start = 0
        for g in groups:
            size = sum(_local(p).numel() for p in g)
            ranges.append((start, start + size))
            ordered.extend(g)
            start += size
        return ranges, ordered

    @torch.no_grad()
    def _gather(self, out: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Copies the local parameters in [lo, hi) of the flat layout into ``out`` (same range)."""
        hi = self._offsets[-1] if hi is None else hi
        for p, a, b in zip(self._params, self._offsets, self._offsets[1:], strict=False):
            if b <= lo or a >= hi:
                continue
            out[a - lo : b - lo].copy_(_local(p).reshape(-1))
        return out

    @torch.no_grad()
    def _scatter(self, src: torch.Tensor, lo: int = 0, hi: int | None = None) -> None:
        """Copies ``src`` (the flat range [lo, hi)) into the local parameters."""
        hi = self._offsets[-1] if hi is None else hi
        for p, a, b in zip(self._params, self._offsets, self._offsets[1:], strict=False):
            if b <= lo or a >= hi:
                continue
            local = _local(p)
            local.copy_(src[a - lo : b - lo].view(local.shape))

    # ---------------------------------------------------------------- public API
    @property
    def outer_params(self) -> torch.Tensor:
        """The outer parameters theta, flat fp32 in this trainer's layout (read-only use)."""
        return self._theta

    @property
    def outer_momentum(self) -> torch.Tensor:
        return self._momentum

    @torch.no_grad()
    def copy_outer_to(self, model: nn.Module) -> None:
        """Copies theta into ``model``, another instance of the wrapped model's class (for eval).

        Plain (unsharded) models only; parameters are matched by name.
        """
        names = {id(p): n for n, p in self.model.named_parameters()}
        target = dict(model.named_parameters())
        for p, a, b in zip(self._params, self._offsets, self._offsets[1:], strict=False):
            dst = target[names[id(p)]]
            dst.copy_(self._theta[a:b].view(dst.shape))

    def outer_hash(self) -> str:
        """A hash of the shared outer state (theta, momentum, counters); equal on in-sync peers."""
        import hashlib

        h = hashlib.sha256()
        for t in self._shared_tensors().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def step(self) -> None:
        """One inner step (after ``loss.backward()``) and, when due, the outer sync. See module doc."""
        t0 = time.perf_counter()
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.stats.inner_s += dt
        self.stats.inner_steps += 1
        self._round_steps += 1
        if self.config.method == "streaming":
            self._streaming_tick()
        elif self._round_steps >= self._local_steps:
            self._outer_round()
        elif self._round_steps == self.config.apply_after_steps and self._in_flight is not None:
            self._apply_early()

    def finish(self, *, timeout_s: float | None = None) -> None:
        """Waits for and applies whatever is in flight, then loads theta into the model.

        Call it at the end of training (every peer, same point): afterwards the model holds the
        outer parameters, which are what should be evaluated (inner parameters evaluate worse).
        """
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        if self._in_flight is not None:
            avg = self._complete(self._in_flight, timeout_s=timeout_s)
            self._in_flight = None
            if avg is not None:
                self._apply(avg)
        for p in sorted(self._fragment_flight):
            flight = self._fragment_flight.pop(p)
            avg = self._complete(flight, timeout_s=timeout_s)
            lo, hi = self._fragment_ranges[p]
            if avg is not None:
                self._apply(avg, lo, hi)
        self._wait_control()
        if self._carry is not None:
            # A round dropped for good at the very end: apply its progress as a last outer step
            # would not be agreed by the peers; keep it out of theta and report it.
            logger.warning("finish: a dropped round's local progress is not in theta")
            self._carry = None
        self._scatter(self._theta)

    def state_dict(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Everything needed to resume this peer exactly: outer state, local state, inner optimizer.

        Blocks until the all-reduces in flight complete (at most ``timeout_s``), since a collective
        cannot be resumed: their averages are saved and applied on schedule after loading. A round
        that fails here is dropped as usual and its contribution saved to travel with the next one.
        """
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        flights: dict[str, Any] = {}
        if self._in_flight is not None:
            self._in_flight = self._settle(self._in_flight, timeout_s, carry=True)
        for p in list(self._fragment_flight):
            settled = self._settle(self._fragment_flight.pop(p), timeout_s, carry=False)
            if settled is not None:
                self._fragment_flight[p] = settled
        if self._in_flight is not None:
            flights["main"] = (self._in_flight.buf.clone(), self._in_flight.sent.clone())
        for p, f in self._fragment_flight.items():
            flights[f"fragment{p}"] = (f.buf.clone(), f.sent.clone())
        return {
            "config": self.config,
            "outer": {k: v.clone() for k, v in self._shared_tensors().items()},
            "offset": None if self._offset is None else self._offset.clone(),
            "offset_momentum": None
            if self._offset_momentum is None
            else self._offset_momentum.clone(),
            "error": None if self._ef is None else self._ef.state_dict(),
            "carry": None if self._carry is None else self._carry.clone(),
            "flights": flights,
            "round_steps": self._round_steps,
            "local_steps": self._local_steps,
            "last_speed": self._last_speed,
            "inner_optimizer": self.inner_optimizer.state_dict(),
        }

    def _settle(self, flight: _InFlight, timeout_s: float, *, carry: bool) -> _InFlight | None:
        """Completes ``flight`` now. A dropped one returns None; with ``carry`` (the pipelined
        methods, whose local parameters were reset) its contribution rides with the next round."""
        if isinstance(flight.handle, _Ready):
            return flight
        avg = self._complete(flight, timeout_s=timeout_s)
        if avg is None:
            if carry:
                self._carry_over(flight.sent)
            return None
        return _InFlight(_Ready(), flight.buf, flight.sent)

    def _carry_over(self, sent: torch.Tensor) -> None:
        """Keeps a dropped round's contribution to travel with the next pseudo-gradient."""
        self._carry = sent.clone() if self._carry is None else self._carry + sent

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``'s output into this trainer and its model (same layout)."""
        if state["config"] != self.config:
            raise ValueError("DiLoCo.load_state_dict: the saved OuterConfig differs from this one")
        outer = state["outer"]
        for name, t in self._shared_tensors().items():
            if name not in outer or outer[name].shape != t.shape:
                raise ValueError(
                    f"DiLoCo.load_state_dict: outer state {name!r} is missing or misshapen"
                )
        self._load_shared(outer)
        for attr in ("offset", "offset_momentum"):
            mine = getattr(self, f"_{attr}")
            if mine is not None and state[attr] is not None:
                mine.copy_(state[attr])
        if self._ef is not None and state["error"] is not None:
            self._ef.load_state_dict(state["error"])
        self._carry = None if state["carry"] is None else state["carry"].clone()
        self._round_steps = int(state["round_steps"])
        self._local_steps = int(state["local_steps"])
        self._last_speed = float(state["last_speed"])
        self._in_flight = None
        self._fragment_flight = {}
        for name, (buf, sent) in state["flights"].items():
            flight = _InFlight(_Ready(), buf.clone(), sent.clone())
            if name == "main":
                self._in_flight = flight
            else:
                self._fragment_flight[int(name.removeprefix("fragment"))] = flight
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])

    # ---------------------------------------------------------------- shared state
    def _shared_tensors(self) -> dict[str, torch.Tensor]:
        # Inner steps are shared only where the schedule depends on them (Streaming); with DyLU
        # they legitimately differ between peers.
        inner = self.stats.inner_steps if self.config.method == "streaming" else 0
        counters = torch.tensor([self.stats.outer_steps, self._dn_count, inner], dtype=torch.int64)
        out = {"theta": self._theta, "momentum": self._momentum, "counters": counters}
        if self._dn_buffer is not None:
            out["dn_buffer"] = self._dn_buffer
        return out

    def _load_shared(self, tensors: dict[str, torch.Tensor]) -> None:
        self._theta.copy_(tensors["theta"])
        self._momentum.copy_(tensors["momentum"])
        if self._dn_buffer is not None:
            self._dn_buffer.copy_(tensors["dn_buffer"])
        outer_steps, dn_count, inner_steps = (int(v) for v in tensors["counters"].tolist())
        self.stats.outer_steps, self._dn_count = outer_steps, dn_count
        if self.config.method == "streaming":
            self.stats.inner_steps = inner_steps

    def _sync_state(self, strategy: str) -> None:
        """Makes the outer state bit-identical on every peer, then loads theta into the model."""
        tensors = self._shared_tensors()
        state = _make_shared_state(tensors, self.stats.outer_steps)
        t0 = time.perf_counter()
        info = self.comm.sync_shared_state(state, strategy, timeout_s=self.config.timeout_s)
        self.stats.comm_wait_s += time.perf_counter() - t0
        self.stats.rx_bytes += int(getattr(info, "rx_bytes", 0))
        self.stats.tx_bytes += int(getattr(info, "tx_bytes", 0))
        self._load_shared(tensors)  # counters travel as a tensor; read them back
        self._scatter(self._theta)
        if self._offset is not None and self._offset_momentum is not None:
            self._offset.zero_()
            self._offset_momentum.zero_()
        self._round_steps = 0

    # ---------------------------------------------------------------- collectives
    def _launch(self, delta: torch.Tensor, tag: int) -> _InFlight:
        sent = delta.clone()
        if self._ef is not None:
            kept = self._ef.decode(self._ef.encode(f"tag{tag}", delta)).to(torch.float32)
            delta.copy_(kept)
            sent = kept.clone()
        handle = self._start(delta, tag)
        return _InFlight(handle, delta, sent)

    def _start(self, buf: torch.Tensor, tag: int) -> AllReduceHandle | None:
        try:
            return self.comm.all_reduce_async(
                buf,
                "avg",
                quantization=self._quantization,
                tag=tag,
                timeout_s=self.config.timeout_s,
            )
        except (LowcommError, TimeoutError, ConnectionError) as exc:
            logger.warning(
                "outer step %d: starting the all-reduce failed: %s", self.stats.outer_steps, exc
            )
            return None

    def _complete(self, flight: _InFlight, *, timeout_s: float) -> torch.Tensor | None:
        """Waits for an all-reduce; retries among survivors or drops. Returns the average or None."""
        attempts = self.config.max_retries if self.config.on_failure == "retry" else 0
        handle = flight.handle
        for attempt in range(attempts + 1):
            if handle is not None:
                t0 = time.perf_counter()
                try:
                    info = handle.wait(timeout_s=None)  # the operation has its own timeout
                except (LowcommError, TimeoutError, ConnectionError) as exc:
                    logger.warning(
                        "outer step %d: all-reduce failed (attempt %d/%d): %s",
                        self.stats.outer_steps,
                        attempt + 1,
                        attempts + 1,
                        exc,
                    )
                else:
                    self.stats.tx_bytes += int(getattr(info, "tx_bytes", 0))
                    self.stats.rx_bytes += int(getattr(info, "rx_bytes", 0))
                    if attempt:
                        self.stats.retried_rounds += 1
                    return flight.buf
                finally:
                    self.stats.comm_wait_s += time.perf_counter() - t0
            if attempt < attempts:
                flight.buf.copy_(flight.sent)  # the failed reduce left it untouched; be sure
                handle = self._start(flight.buf, _TAG_DELTA)
        # Dropped: no outer step. The caller keeps this peer's progress for the next round.
        self.stats.dropped_rounds += 1
        logger.warning(
            "outer step %d dropped; local progress kept for the next round", self.stats.outer_steps
        )
        return None

    def _reduce_now(self, delta: torch.Tensor, tag: int) -> torch.Tensor | None:
        return self._complete(self._launch(delta, tag), timeout_s=self.config.timeout_s)

    def _peers_pending(self) -> bool:
        """Asks the master whether peers wait to join; every peer gets the same answer.

        Called only where no all-reduce of ours is in flight: the real communicator runs its
        collectives in order on one thread, so asking behind an in-flight all-reduce would wait
        for it. A failure to ask counts as "nobody pending" (it fails on every peer alike).
        """
        t0 = time.perf_counter()
        try:
            return bool(self.comm.are_peers_pending(timeout_s=self.config.timeout_s))
        except (LowcommError, TimeoutError, ConnectionError) as exc:
            logger.warning("are_peers_pending failed: %s", exc)
            return False
        finally:
            self.stats.comm_wait_s += time.perf_counter() - t0

    def _start_control(self, speed: float) -> None:
        """DyLU: launches a tiny max-reduce of this round's speed, read at the next outer step."""
        if not self.config.dynamic_local_steps:
            return
        buf = torch.tensor([speed], dtype=torch.float32)
        try:
            handle = self.comm.all_reduce_async(
                buf, "max", quantization=None, tag=_TAG_CONTROL, timeout_s=self.config.timeout_s
            )
        except (LowcommError, TimeoutError, ConnectionError) as exc:
            logger.warning("speed all-reduce failed to start: %s", exc)
            return
        self._control = (handle, buf)

    def _wait_control(self) -> float:
        """The fastest peer's speed from the last round's control reduce (0 if none or failed)."""
        if self._control is None:
            return 0.0
        handle, buf = self._control
        self._control = None
        t0 = time.perf_counter()
        try:
            handle.wait(timeout_s=None)
        except (LowcommError, TimeoutError, ConnectionError) as exc:
            # Every peer sees the same failure of this collective, so all skip the same update.
            logger.warning("speed all-reduce failed: %s", exc)
            return 0.0
        finally:
            self.stats.comm_wait_s += time.perf_counter() - t0
        return float(buf[0].item())

    # ---------------------------------------------------------------- outer updates
    def _apply(self, avg: torch.Tensor, lo: int = 0, hi: int | None = None) -> None:
        """Applies one averaged pseudo-gradient to theta[lo:hi] with the configured rule."""
        hi = self._offsets[-1] if hi is None else hi
        cfg = self.config
        theta, mom = self._theta[lo:hi], self._momentum[lo:hi]
        avg = avg.to(theta.device)
        if cfg.method == "co2":
            co2_step(
                theta,
                mom,
                avg,
                lr=cfg.outer_lr,
                beta=cfg.outer_momentum or 0.0,
                gap_penalty=cfg.co2_gap_penalty,
                clip=cfg.co2_clip,
            )
        elif cfg.method == "delayed_nesterov":
            assert self._dn_buffer is not None
            self._dn_count = delayed_nesterov_step(
                theta,
                mom,
                self._dn_buffer,
                avg,
                count=self._dn_count,
                period=cfg.dn_period,
                lr=cfg.outer_lr,
                mu=cfg.outer_momentum or 0.0,
            )
        else:
            nesterov_step(
                theta,
                mom,
                avg,
                lr=cfg.outer_lr,
                mu=cfg.outer_momentum or 0.0,
                nesterov=cfg.nesterov,
            )
        self.stats.outer_steps += 1

    def _pseudogradient(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """theta (plus this peer's eager offset) minus the local parameters, plus any dropped round."""
        hi = self._offsets[-1] if hi is None else hi
        local = self._gather(
            torch.empty(hi - lo, dtype=torch.float32, device=self._theta.device), lo, hi
        )
        delta = self._theta[lo:hi] - local
        if self._offset is not None:
            delta.add_(self._offset[lo:hi])
        if self._carry is not None and lo == 0 and hi == self._offsets[-1]:
            delta.add_(self._carry)
            self._carry = None
        return delta

    def _outer_round(self) -> None:
        try:
            self._outer_round_inner()
        finally:
            self._round_start = time.perf_counter()
            self._round_wait_start = self.stats.comm_wait_s

    def _outer_round_inner(self) -> None:
        cfg = self.config
        delta = self._pseudogradient()
        now = time.perf_counter()
        steps_done = self._round_steps
        compute_s = (now - self._round_start) - (self.stats.comm_wait_s - self._round_wait_start)
        self._round_steps = 0
        # Rounded as it travels (fp32), so that the fastest peer sees exactly its own speed.
        own_speed = float(torch.tensor(steps_done / compute_s if compute_s > 0 else 0.0).float())
        if not cfg.is_pipelined:
            avg = self._reduce_now(delta, _TAG_DELTA)
            if avg is not None:
                self._apply(avg)
                self._scatter(self._theta)
            # On a drop the local parameters keep their progress and theta is unchanged, so the
            # next pseudo-gradient carries this round's progress by itself.
            if self._peers_pending():
                self._admit()
            self._start_control(own_speed)
            return
        # One-step-delayed pipeline: apply round k-1's average, start round k's all-reduce.
        stale: torch.Tensor | None = None
        if self._in_flight is not None:
            flight, self._in_flight = self._in_flight, None
            stale = flight.sent
            avg = self._complete(flight, timeout_s=cfg.timeout_s)
            if avg is not None:
                self._apply(avg)
            else:
                delta.add_(flight.sent)  # the dropped round's progress rides with this one
        max_speed = self._wait_control()
        if self._peers_pending():
            # A joiner cannot enter an all-reduce already in flight: drain the pipeline.
            flight = self._launch(delta, _TAG_DELTA)
            avg = self._complete(flight, timeout_s=cfg.timeout_s)
            if avg is not None:
                self._apply(avg)
            else:
                self._carry = flight.sent.clone()  # travels with the next round
            self._admit()
            self._start_control(own_speed)
            return
        if cfg.eager and self._offset is not None and self._offset_momentum is not None:
            # Eager: this peer's fresh contribution replaces its stale share of the delayed
            # average; tracked as a local offset from the (bit-identical) shared theta.
            world = max(1, int(self.comm.world_size))
            diff = delta - stale if stale is not None else delta.clone()
            nesterov_step(
                self._offset,
                self._offset_momentum,
                diff.div_(world),
                lr=cfg.outer_lr,
                mu=cfg.outer_momentum or 0.0,
                nesterov=cfg.nesterov,
            )
            self._scatter(self._theta + self._offset)
        else:
            self._scatter(self._theta)
        if cfg.dynamic_local_steps and max_speed > 0 and self._last_speed > 0:
            # DyLU from last round's speeds (the control reduce is one round behind).
            self._local_steps = dynamic_local_steps(
                cfg.sync_every,
                own_speed=self._last_speed,
                max_speed=max(max_speed, self._last_speed),
                min_steps=cfg.min_local_steps,
            )
        self._last_speed = own_speed
        self._in_flight = self._launch(delta, _TAG_DELTA)
        self._start_control(own_speed)

    def _apply_early(self) -> None:
        """Applies last round's average now, tau steps into this round (``apply_after_steps``).

        The local parameters move by exactly as much as the round's starting point does (theta
        plus any eager offset before, the new theta after), so the inner progress made since the
        round began is kept, and the next pseudo-gradient, measured from the new theta, carries it.
        """
        assert self._in_flight is not None
        flight, self._in_flight = self._in_flight, None
        avg = self._complete(flight, timeout_s=self.config.timeout_s)
        if avg is None:
            # Dropped: theta and the starting point stay; this peer's share rides with the next.
            self._carry_over(flight.sent)
            return
        local = self._gather(torch.empty_like(self._theta))
        old_start = self._theta.clone()
        if self._offset is not None and self._offset_momentum is not None:
            old_start.add_(self._offset)
            self._offset.zero_()
            self._offset_momentum.zero_()
        self._apply(avg)
        local.add_(self._theta).sub_(old_start)
        self._scatter(local)

    def _admit(self) -> None:
        """Admits pending peers at this outer step: topology update, then shared-state sync."""
        t0 = time.perf_counter()
        self.comm.update_topology(timeout_s=self.config.timeout_s)
        self.stats.comm_wait_s += time.perf_counter() - t0
        self.stats.joins += 1
        self._sync_state("enforce_popular")

    # ---------------------------------------------------------------- streaming
    def _streaming_tick(self) -> None:
        cfg = self.config
        spacing = cfg.sync_every // cfg.num_fragments
        t = self.stats.inner_steps
        if (t + cfg.overlap_steps) % spacing == 0:
            p = ((t + cfg.overlap_steps) // spacing - 1) % cfg.num_fragments
            lo, hi = self._fragment_ranges[p]
            if p in self._fragment_flight:  # cannot happen with overlap < spacing; be safe
                raise LowcommError(f"fragment {p} is already in flight")
            self._fragment_flight[p] = self._launch(self._pseudogradient(lo, hi), _TAG_FRAGMENT + p)
        if t % spacing == 0 and self._fragment_flight:
            p = (t // spacing - 1) % cfg.num_fragments
            flight = self._fragment_flight.pop(p, None)
            if flight is None:
                return
            lo, hi = self._fragment_ranges[p]
            avg = self._complete(flight, timeout_s=cfg.timeout_s)
            if avg is not None:
                self._apply(avg, lo, hi)
                local = self._gather(
                    torch.empty(hi - lo, dtype=torch.float32, device=self._theta.device), lo, hi
                )
                streaming_merge(local, self._theta[lo:hi], alpha=cfg.merge_alpha)
                self._scatter(local, lo, hi)
            # On a drop the fragment keeps its local progress, which its next pseudo-gradient
            # (measured against the unchanged theta) carries.
            if not self._fragment_flight and self._peers_pending():
                self._admit()
