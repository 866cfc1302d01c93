"""One training peer as a process: connect to the master, train the tiny GPT with DiLoCo, report.

Used by ``lowcomm demo``, ``benchmarks/diloco.py`` and the multi-process tests. A peer sends
events to its parent through a multiprocessing queue: ``("progress", index, {...})`` every
``report_every`` inner steps, ``("snapshot", index, {...})`` with the parameters it would ship
when ``snapshots`` is set (peer 0 only), ``("done", index, {...})`` with the hash of its outer
state at the end, or ``("error", index, traceback)``. ``faults`` arms a
``lowcomm.faults.FaultInjector`` in the peer process; ``kill_at_inner_step(n)`` makes it exit
abruptly once inner step ``n`` is done (no goodbye to the master, sockets just close).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector

from lowcomm.checkpoint import CheckpointConfig
from lowcomm.comm import CommConfig, Communicator
from lowcomm.comm.shaper import Shaper
from lowcomm.comm.shared_state import tensor_hash
from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.faults import FaultInjector
from lowcomm.launch.experiments import LM_WARMUP_STEPS, Corpus, LMAdamW, build_gpt, evaluate
from lowcomm.launch.tasks import ByteBatches
from lowcomm.launch.tinygpt import GPT, GPTConfig, sample_batch
from lowcomm.launch.volunteer import open_trainer

__all__ = [
    "FaultSpec",
    "PeerSpec",
    "kill_at_inner_step",
    "outer_steps_for",
    "run_peer",
    "wait_for_world",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    """One fault for a peer process to arm: the arguments of ``FaultInjector.inject``.

    ``PeerSpec`` carries specs, not an injector, because it is pickled to the child process and
    an injector holds a lock; the peer builds its injector from them.
    """

    point: str
    kill: bool = False
    delay_s: float = 0.0
    where: Mapping[str, Any] = field(default_factory=dict)
    times: int | None = 1
    after: int = 0

    def arm(self, faults: FaultInjector) -> None:
        """Arms this fault on ``faults``; ValueError for an unknown point."""
        faults.inject(
            self.point,
            kill=self.kill,
            delay_s=self.delay_s,
            where=self.where,
            times=self.times,
            after=self.after,
        )


def kill_at_inner_step(step: int) -> FaultSpec:
    """The peer dies abruptly (``os._exit(KILLED_EXIT_CODE)``) once inner step ``step`` is done.

    Inner steps count from 1 in the peer's own loop (a joiner counts from its own start).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1 (inner steps count from 1), got {step}")
    return FaultSpec(point="trainer.inner_step", kill=True, where={"step": step})


@dataclass(frozen=True, kw_only=True)
class PeerSpec:
    """What one peer process does (picklable)."""

    master: str
    token: bytes
    index: int
    num_peers: int  # wait for this many accepted peers before training (ignored when joining)
    joining: bool = False
    outer: OuterConfig
    gpt: GPTConfig
    batch_size: int = 16
    lr: float = 2e-3  # the inner AdamW's (LMAdamW: betas (0.9, 0.95), weight decay 0.1)
    warmup_steps: int = LM_WARMUP_STEPS
    outer_steps: int = 10  # stop once this many outer steps are applied (same point on every peer)
    # ... and, past that, go on (up to max_outer_steps, default 3x outer_steps) until this many
    # peers take part: the demo and the tests wait this way for a rejoining peer. World size and
    # outer steps change only at outer steps, identically on every peer, so all still stop at the
    # same point (a wall-clock limit would not: peers would disagree on when it passed).
    min_final_world: int = 0
    max_outer_steps: int | None = None
    bandwidth_bps: float | None = None
    latency_ms: float = 0.0
    faults: tuple[FaultSpec, ...] = ()  # armed in the peer process, e.g. kill_at_inner_step(n)
    corpus_bytes: int | None = None
    seed: int = 0
    report_every: int = 10
    evaluate_at_end: bool = False
    threads: int = 1
    timeout_s: float = 60.0
    heartbeat_interval_s: float | None = None
    mode: str = "diloco"  # or "ddp": all-reduce the gradients every step (data-parallel)
    time_budget_s: float | None = None  # ddp: stop (all peers at once) after this long
    max_steps: int | None = None  # ddp: stop after this many steps
    device: str = "cpu"  # where the model trains ("cuda:0", ...); outer state stays on CPU
    # Peer 0 sends the parameters it would ship (the outer parameters; for ddp, the model's)
    # after each outer step and at the end (ddp: every ``snapshot_every`` steps), with the
    # training seconds so far; the parent evaluates them after the run.
    snapshots: bool = False
    snapshot_every: int = 10
    # Checkpoint locally at every outer step and resume from it on restart (the demo's killed
    # peer): a ``("resumed", index, {...})`` event says from which inner step.
    checkpoint_dir: str | None = None

    def kill_step(self) -> int | None:
        """The inner step at which a ``kill_at_inner_step`` fault ends this peer, if one is armed."""
        for fault in self.faults:
            if fault.point == "trainer.inner_step" and fault.kill:
                return fault.where.get("step")
        return None


def outer_steps_for(outer: OuterConfig, inner_steps: int) -> int:
    """How many outer steps ``inner_steps`` inner steps make for this method (at least 1).

    Streaming counts one outer step per fragment sync; the one-step-delayed methods apply round
    k's average ``apply_after_steps`` inner steps into round k+1 (the end of it by default before;
    a tenth of it now), so the count is the fewest that covers ``inner_steps`` (the same as before
    for the full-round delay and a multiple of ``sync_every``).
    """
    if outer.method == "streaming":
        return max(1, inner_steps // (outer.sync_every // outer.num_fragments))
    if outer.is_pipelined:
        tau = outer.apply_after_steps or outer.sync_every
        return max(1, -(-(inner_steps - tau) // outer.sync_every))
    return max(1, inner_steps // outer.sync_every)


def wait_for_world(comm: Any, num_peers: int, *, timeout_s: float) -> None:
    """Admits peers until ``num_peers`` are accepted. Every accepted peer calls it (lockstep)."""
    deadline = time.monotonic() + timeout_s
    while comm.world_size < num_peers:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {comm.world_size} of {num_peers} peers joined in {timeout_s} s"
            )
        comm.update_topology(timeout_s=timeout_s)


def run_peer(spec: PeerSpec, events: Any) -> None:
    """Process entry point; never raises (errors become an ``("error", ...)`` event)."""
    try:
        _run(spec, events)
    except BaseException:
        events.put(("error", spec.index, traceback.format_exc()))
        raise SystemExit(1) from None


def _run(spec: PeerSpec, events: Any) -> None:
    torch.set_num_threads(spec.threads)
    corpus = Corpus.load(max_bytes=spec.corpus_bytes)
    shaper = None
    if spec.bandwidth_bps is not None or spec.latency_ms > 0:
        shaper = Shaper(bandwidth_bps=spec.bandwidth_bps, latency_ms=spec.latency_ms)
    config = CommConfig(
        timeout_s=spec.timeout_s,
        poll_s=0.2,
        num_connections=2,
        shaper=shaper,
        heartbeat_interval_s=spec.heartbeat_interval_s,
    )
    # Everything slow happens before connecting, so that a joiner admitted by the running peers
    # is ready for the shared-state sync at once (they wait for it there).
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_gpt(spec.gpt, seed=spec.seed).to(device)  # torch's init, as the calibration
    opt = LMAdamW(model.parameters(), lr=spec.lr, warmup_steps=spec.warmup_steps)
    # Peer 0's copy of the outer parameters for its snapshots: on CPU, where theta lives.
    probe = GPT(spec.gpt) if spec.snapshots and spec.mode != "ddp" else model
    comm = Communicator(spec.master, peer_group=0, token=spec.token, config=config)
    comm.connect(timeout_s=spec.timeout_s * 4)
    if not spec.joining:
        wait_for_world(comm, spec.num_peers, timeout_s=spec.timeout_s * 4)
    elif comm.world_size == 1:
        # Accepted into an empty run: the others have finished; there is nothing to join.
        events.put(("late", spec.index, {}))
        comm.close()
        return
    if spec.mode == "ddp":
        _run_ddp(spec, events, comm, model, opt, corpus, _Snapshots(spec, events, model, 0.0))
        return
    faults = FaultInjector()
    for fault in spec.faults:
        fault.arm(faults)
    # DiLoCo hits "trainer.inner_step" with the number of inner steps done so far, so a
    # kill armed at step N fires once N steps are done, before any of step N+1 is applied.
    batches = ByteBatches(
        corpus.train,
        batch_size=spec.batch_size,
        context=spec.gpt.context,
        seed=spec.seed * 1000 + spec.index + 1,
    )
    step = 0
    if spec.checkpoint_dir is not None:
        volunteer = open_trainer(
            model,
            opt,
            comm,
            outer=spec.outer,
            checkpoint=CheckpointConfig(levels=(spec.checkpoint_dir,), keep_last_local=1),
            checkpoint_every_outer=1,
            stateful={"data": batches},
            faults=faults,
            joining=spec.joining,
        )
        trainer, train_step = volunteer.diloco, volunteer.step
        if volunteer.resumed_from is not None:
            step = volunteer.resumed_from
            events.put(("resumed", spec.index, {"inner_step": step}))
        elif spec.joining:
            # Killed before its first checkpoint was durable: it comes back as a fresh joiner.
            events.put(("fresh", spec.index, {}))
    else:
        trainer = DiLoCo(model, opt, comm, config=spec.outer, joining=spec.joining, faults=faults)
        train_step = trainer.step
    tokens = spec.batch_size * spec.gpt.context
    snaps = _Snapshots(spec, events, probe, trainer.stats.comm_wait_s)
    t_start = snaps.t_start
    last_t, last_step = t_start, step
    # Steady state: from the first outer step applied (a pipelined method's first round has no
    # wait to pair with) to the end of the loop (the final drain is a one-off, reported apart).
    steady: tuple[float, float] | None = None

    def more() -> bool:
        done = trainer.stats.outer_steps
        if done < spec.outer_steps:
            return True
        cap = spec.max_outer_steps or 3 * spec.outer_steps
        return comm.world_size < spec.min_final_world and done < cap

    while more():
        x, y = next(batches)
        loss = model(x.to(device), y.to(device))
        loss.backward()
        train_step()
        step += 1
        if steady is None and trainer.stats.outer_steps > 0:
            steady = (snaps.now(), trainer.stats.comm_wait_s)
        snaps.after_step(step, trainer)
        if step % spec.report_every == 0:
            now = time.perf_counter()
            events.put(
                (
                    "progress",
                    spec.index,
                    {
                        "step": step,
                        "outer_steps": trainer.stats.outer_steps,
                        "loss": loss.item(),
                        "tokens_per_s": tokens * (step - last_step) / max(now - last_t, 1e-9),
                        "tx_bytes": trainer.stats.tx_bytes,
                        "world_size": comm.world_size,
                        "elapsed_s": now - t_start,
                        "comm_wait_s": trainer.stats.comm_wait_s,
                    },
                )
            )
            last_t, last_step = now, step
    t0, wait0 = steady or (0.0, snaps.wait_before)
    steady_s, steady_wait_s = snaps.now() - t0, trainer.stats.comm_wait_s - wait0
    trainer.finish()  # waits for the last all-reduce in flight: the pipeline's drain
    snaps.record(step, trainer.copy_outer_to)
    wall = snaps.now()
    result = {
        "steady_s": steady_s,
        "steady_wait_s": steady_wait_s,
        "hash": trainer.outer_hash(),
        "outer_steps": trainer.stats.outer_steps,
        "inner_steps": step,
        "world_size": comm.world_size,
        "tx_bytes": trainer.stats.tx_bytes,
        "rx_bytes": trainer.stats.rx_bytes,
        "retried": trainer.stats.retried_rounds,
        "dropped": trainer.stats.dropped_rounds,
        "joins": trainer.stats.joins,
        "inner_s": trainer.stats.inner_s,
        "comm_wait_s": trainer.stats.comm_wait_s - snaps.wait_before,
        "wall_s": wall,
        "val_loss": evaluate(model, corpus, num_batches=4) if spec.evaluate_at_end else None,
    }
    events.put(("done", spec.index, result))
    comm.close()


class _Snapshots:
    """Peer 0's record of what it would ship: (inner step, training seconds, parameters).

    Nothing is evaluated here: the parent evaluates the parameters after the run, so no network
    work can hide behind an evaluation left off the clock. The copy's own time is left off it.
    Other peers keep the clock and record nothing.
    """

    def __init__(self, spec: PeerSpec, events: Any, probe: GPT, wait_before: float) -> None:
        self.index, self.events, self.probe = spec.index, events, probe
        self.enabled = spec.snapshots and spec.index == 0
        self.wait_before = wait_before  # network wait before the clock started (state sync)
        self.outer_steps = 0  # the last outer step snapshotted
        self.paused_s = 0.0
        self.t_start = time.perf_counter()

    def now(self) -> float:
        """Training seconds so far."""
        return time.perf_counter() - self.t_start - self.paused_s

    def after_step(self, step: int, trainer: DiLoCo) -> None:
        """Snapshots the outer parameters if an outer step was applied since the last one."""
        if trainer.stats.outer_steps > self.outer_steps:
            self.outer_steps = trainer.stats.outer_steps
            self.record(step, trainer.copy_outer_to)

    def record(self, step: int, copy_into: Callable[[GPT], None] | None = None) -> None:
        if not self.enabled:
            return
        t0 = time.perf_counter()
        seconds = self.now()
        if copy_into is not None:
            copy_into(self.probe)
        flat = parameters_to_vector(self.probe.parameters()).detach().cpu().numpy()
        self.events.put(
            ("snapshot", self.index, {"step": step, "seconds": seconds, "params": flat})
        )
        self.paused_s += time.perf_counter() - t0


def _run_ddp(
    spec: PeerSpec,
    events: Any,
    comm: Any,
    model: GPT,
    opt: torch.optim.Optimizer,
    corpus: Corpus,
    snaps: _Snapshots,
) -> None:
    """Data-parallel over the same communicator: one fp32 gradient all-reduce per step.

    The last element of the reduced buffer is a stop flag (max over peers, via the average being
    non-zero), so every peer stops at the same step when one runs out of time.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    device = params[0].device
    buf = torch.zeros(numel + 1, device=device)
    gen = torch.Generator().manual_seed(spec.seed * 1000 + spec.index + 1)
    tokens = spec.batch_size * spec.gpt.context
    t_start = snaps.t_start
    last_t, last_step, tx, inner_s = t_start, 0, 0, 0.0
    step = 0
    while True:
        t0 = time.perf_counter()
        x, y = sample_batch(
            corpus.train, batch_size=spec.batch_size, context=spec.gpt.context, generator=gen
        )
        loss = model(x.to(device), y.to(device))
        loss.backward()
        inner_s += time.perf_counter() - t0
        torch.cat([p.grad.reshape(-1) for p in params], out=buf[:numel])  # type: ignore[union-attr]
        over_time = (
            spec.time_budget_s is not None and time.perf_counter() - t_start > spec.time_budget_s
        )
        over_steps = spec.max_steps is not None and step + 1 >= spec.max_steps
        buf[numel] = 1.0 if (over_time or over_steps) else 0.0
        info = comm.all_reduce(buf, "avg", timeout_s=spec.timeout_s)
        tx += int(info.tx_bytes)
        t0 = time.perf_counter()
        offset = 0
        for p in params:
            assert p.grad is not None
            p.grad.copy_(buf[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        opt.step()
        opt.zero_grad(set_to_none=False)
        inner_s += time.perf_counter() - t0
        step += 1
        stop = bool(buf[numel] > 0)
        if step % spec.snapshot_every == 0 or stop:
            snaps.record(step)
        if step % spec.report_every == 0 or stop:
            now = time.perf_counter()
            events.put(
                (
                    "progress",
                    spec.index,
                    {
                        "step": step,
                        "outer_steps": step,
                        "loss": loss.item(),
                        "tokens_per_s": tokens * (step - last_step) / max(now - last_t, 1e-9),
                        "tx_bytes": tx,
                        "world_size": comm.world_size,
                        "elapsed_s": now - t_start,
                    },
                )
            )
            last_t, last_step = now, step
        if stop:
            break
    wall = snaps.now()

    flat = torch.cat([p.detach().reshape(-1) for p in params]).cpu()
    events.put(
        (
            "done",
            spec.index,
            {
                "steady_s": wall,
                "steady_wait_s": wall - inner_s,
                "hash": tensor_hash(flat),
                "outer_steps": step,
                "inner_steps": step,
                "world_size": comm.world_size,
                "tx_bytes": tx,
                "rx_bytes": tx,
                "retried": 0,
                "dropped": 0,
                "joins": 0,
                "inner_s": inner_s,
                "comm_wait_s": wall - inner_s,
                "wall_s": wall,
                "val_loss": evaluate(model, corpus, num_batches=4)
                if spec.evaluate_at_end
                else None,
            },
        )
    )
    comm.close()
