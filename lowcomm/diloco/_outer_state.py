"""``OuterState``: one peer's outer-loop state (theta, momentum, the method's update rule and its
buffers, the eager offset, a dropped round's carry) and the shared-state sync that keeps the shared
part bit-identical on every peer."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lowcomm.comm import SharedState
from lowcomm.diloco._layout import ParamLayout
from lowcomm.diloco._outer_comm import OuterComm
from lowcomm.diloco._rules import co2_step, delayed_nesterov_step, nesterov_step
from lowcomm.diloco._stats import OuterStats
from lowcomm.diloco.config import OuterConfig

__all__ = ["OuterState"]


class OuterState:
    """The outer parameters and everything the outer update reads or writes, on one peer.

    Shared (identical on every peer, what a joiner receives): ``theta`` and ``momentum`` (flat fp32
    on ``config.outer_device``, in ``layout`` order), delayed Nesterov's ``dn_buffer`` and
    ``dn_count``, the outer-step counter, the shared-state ``revision`` (how many shared-state
    syncs the outer state has been through: joiners receive it) and, where the schedule depends
    on it, the inner-step counter. ``stamp()`` (outer step, revision) travels with every
    pseudo-gradient all-reduce, which the master refuses between peers at different stamps. Local: the eager ``offset`` and its momentum (async with ``eager``), a dropped round's
    ``carry``, and ``round_steps``. Training thread only.

    Args:
        share_inner_steps: the method's schedule depends on the inner-step counter (Streaming), so
            it is shared; otherwise (DyLU) it legitimately differs between peers.
    """

    def __init__(
        self,
        comm: OuterComm,
        *,
        layout: ParamLayout,
        config: OuterConfig,
        stats: OuterStats,
        share_inner_steps: bool,
    ) -> None:
        self.comm = comm
        self.layout = layout
        self.config = config
        self.stats = stats
        self.share_inner_steps = share_inner_steps
        dev = torch.device(config.outer_device)
        # empty, not zeros: the gather writes every element (a zero pass of 400 MB at 100M params).
        self.theta = layout.gather(torch.empty(layout.numel, dtype=torch.float32, device=dev))
        self.momentum = torch.zeros_like(self.theta)
        # delayed Nesterov's buffer; eager updates' local offset and its momentum (local state).
        self.dn_buffer = (
            torch.zeros_like(self.theta) if config.method == "delayed_nesterov" else None
        )
        self.offset: torch.Tensor | None = None
        self.offset_momentum: torch.Tensor | None = None
        if config.eager:
            self.offset = torch.zeros_like(self.theta)
            self.offset_momentum = torch.zeros_like(self.theta)
        self.dn_count = 0
        self.revision = 0
        self.round_steps = 0
        self.carry: torch.Tensor | None = None  # a dropped round's progress, sent with the next
        # The outer step the last shared-state sync agreed on: a saved outer state older than it
        # is never loaded (DiLoCo.load_state_dict), so a resumed peer cannot roll the run back.
        self.synced_outer_step = 0
        rules: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]] = {
            "co2": self._co2,
            "delayed_nesterov": self._delayed_nesterov,
        }
        self._rule = rules.get(config.method, self._nesterov)

    # ---------------------------------------------------------------- the outer update
    def apply(self, avg: torch.Tensor, lo: int = 0, hi: int | None = None) -> None:
        """Applies one averaged pseudo-gradient to theta[lo:hi] with the method's rule."""
        hi = self.layout.numel if hi is None else hi
        theta, mom = self.theta[lo:hi], self.momentum[lo:hi]
        self._rule(theta, mom, avg.to(theta.device))
        self.stats.outer_steps += 1

    def _nesterov(self, theta: torch.Tensor, mom: torch.Tensor, avg: torch.Tensor) -> None:
        cfg = self.config
        nesterov_step(
            theta,
            mom,
            avg,
            lr=cfg.outer_lr or 0.0,
            mu=cfg.outer_momentum or 0.0,
            nesterov=cfg.nesterov,
        )

    def _co2(self, theta: torch.Tensor, mom: torch.Tensor, avg: torch.Tensor) -> None:
        cfg = self.config
        co2_step(
            theta,
            mom,
            avg,
            lr=cfg.outer_lr or 0.0,
            beta=cfg.outer_momentum or 0.0,
            gap_penalty=cfg.co2_gap_penalty,
            clip=cfg.co2_clip,
        )

    def _delayed_nesterov(self, theta: torch.Tensor, mom: torch.Tensor, avg: torch.Tensor) -> None:
        cfg = self.config
        assert self.dn_buffer is not None
        self.dn_count = delayed_nesterov_step(
            theta,
            mom,
            self.dn_buffer,
            avg,
            count=self.dn_count,
            period=cfg.dn_period,
            lr=cfg.outer_lr or 0.0,
            mu=cfg.outer_momentum or 0.0,
        )

    def eager_step(self, diff: torch.Tensor) -> None:
        """Moves the eager offset by the method's step on ``diff`` (fresh minus stale share).

        The rules are linear in the pseudo-gradient, so applying one to the delayed average with
        this peer's share swapped moves theta by the rule applied to the difference: async's
        Nesterov step, CO2's heavy-ball step (its clip, a bound on the shared momentum, is left
        to the shared update), delayed Nesterov's as one Nesterov step of lr / dn_period (exact
        for dn_period 1). Local state only: the shared theta keeps the true averages.
        """
        cfg = self.config
        assert self.offset is not None and self.offset_momentum is not None
        lr, mu = cfg.outer_lr or 0.0, cfg.outer_momentum or 0.0
        if cfg.method == "co2":
            co2_step(
                self.offset,
                self.offset_momentum,
                diff,
                lr=lr,
                beta=mu,
                gap_penalty=cfg.co2_gap_penalty,
                clip=None,
            )
        elif cfg.method == "delayed_nesterov":
            nesterov_step(self.offset, self.offset_momentum, diff, lr=lr / cfg.dn_period, mu=mu)
        else:
            nesterov_step(
                self.offset, self.offset_momentum, diff, lr=lr, mu=mu, nesterov=cfg.nesterov
            )

    def local_params(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """A new flat fp32 copy of the local parameters in [lo, hi), on theta's device."""
        hi = self.layout.numel if hi is None else hi
        out = torch.empty(hi - lo, dtype=torch.float32, device=self.theta.device)
        return self.layout.gather(out, lo, hi)

    def pseudogradient(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """theta (plus this peer's eager offset) minus the local parameters, plus any dropped round."""
        hi = self.layout.numel if hi is None else hi
        delta = self.theta[lo:hi] - self.local_params(lo, hi)
        if self.offset is not None:
            delta.add_(self.offset[lo:hi])
        if self.carry is not None and lo == 0 and hi == self.layout.numel:
            delta.add_(self.carry)
            self.carry = None
        return delta

    def carry_over(self, sent: torch.Tensor) -> None:
        """Keeps a dropped round's contribution to travel with the next pseudo-gradient."""
        self.carry = sent.clone() if self.carry is None else self.carry + sent

    # ---------------------------------------------------------------- shared state
    def stamp(self) -> dict[str, int]:
        """Where this peer's outer state is: every participant of an all-reduce must agree."""
        return {"outer_step": self.stats.outer_steps, "revision": self.revision}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """The shared part, by name (the tensors themselves; counters as a new int64 tensor)."""
        inner = self.stats.inner_steps if self.share_inner_steps else 0
        counters = torch.tensor(
            [self.stats.outer_steps, self.dn_count, inner, self.revision], dtype=torch.int64
        )
        out = {"theta": self.theta, "momentum": self.momentum, "counters": counters}
        if self.dn_buffer is not None:
            out["dn_buffer"] = self.dn_buffer
        return out

    def load_shared(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copies ``shared_tensors()``'s output (synced or saved) back into this state."""
        self.theta.copy_(tensors["theta"])
        self.momentum.copy_(tensors["momentum"])
        if self.dn_buffer is not None:
            self.dn_buffer.copy_(tensors["dn_buffer"])
        # A state saved before the revision was shared has three counters: revision 0.
        outer_steps, dn_count, inner_steps, revision = (
            [int(v) for v in tensors["counters"].tolist()] + [0]
        )[:4]
        self.stats.outer_steps, self.dn_count, self.revision = outer_steps, dn_count, revision
        if self.share_inner_steps:
            self.stats.inner_steps = inner_steps

    def sync(self, strategy: str, *, keep_round: bool = False) -> bool:
        """Makes the shared state bit-identical on every peer, then loads theta into the model.

        Every peer calls it at the same point (``strategy="receive_only"`` for a joiner); blocks up
        to ``config.timeout_s``; a failure propagates. The local round restarts from theta, except
        with ``keep_round`` when nothing changed (the model, eager offset and round position are
        then left as they are: a whole run restarted from one checkpoint resumes exactly).

        Returns:
            True if the shared values changed (another peer's state was taken): judged from what
            the communicator says it fetched, never by hashing the state again.
        """
        tensors = self.shared_tensors()
        before = tensors["counters"][:3].tolist()  # outer step, dn count, inner steps
        state = SharedState(tensors=tensors, revision=self.stats.outer_steps)
        t0 = time.perf_counter()
        info = self.comm.sync_shared_state(state, strategy, timeout_s=self.config.timeout_s)
        self.stats.comm_wait_s += time.perf_counter() - t0
        self.stats.rx_bytes += int(getattr(info, "rx_bytes", 0))
        self.stats.tx_bytes += int(getattr(info, "tx_bytes", 0))
        changed = _changed(info, before, tensors["counters"][:3].tolist())
        self.load_shared(tensors)  # counters travel as a tensor; read them back
        self.synced_outer_step = self.stats.outer_steps
        self.revision += 1  # on every peer alike, so the stamps still agree
        if keep_round and not changed:
            return False
        self.layout.scatter(self.theta)
        if self.offset is not None and self.offset_momentum is not None:
            self.offset.zero_()
            self.offset_momentum.zero_()
        self.round_steps = 0
        return changed

    def admit(self) -> None:
        """Admits pending peers at this outer step: topology update, then shared-state sync."""
        t0 = time.perf_counter()
        self.comm.update_topology(timeout_s=self.config.timeout_s)
        self.stats.comm_wait_s += time.perf_counter() - t0
        self.stats.joins += 1
        self.sync("enforce_popular")


def _changed(info: object, before: list[int], after: list[int]) -> bool:
    """Whether a sync changed the shared values (the revision aside). No bytes received: nothing
    changed. Bytes received: changed unless the communicator names what it fetched and that was
    only the counters, with the same outer step, dn count and inner steps (only the revision
    differed). A communicator that names nothing (PCCL) counts as changed: taking the run's state
    is always safe, keeping a stale round is not."""
    if after != before:
        return True
    if int(getattr(info, "rx_bytes", 0) or 0) == 0:
        return False
    names = list(getattr(info, "received", None) or [])
    return not names or any(n != "counters" for n in names)
