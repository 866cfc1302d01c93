"""The outer loop's collectives, each safe to fail: pseudo-gradient all-reduces with bounded retry
among the survivors or a drop, the are-peers-pending poll, and DyLU's speed max-reduce.

Nothing here raises on a network failure: a failed all-reduce is retried, then dropped (the caller
keeps the round's progress), a failed poll answers "nobody pending" and a failed speed reduce
"no speed", and each failure is the same on every peer, so all peers take the same branch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from lowcomm.comm import NonFiniteError, StaleStateError
from lowcomm.compression import ErrorFeedback, get_codec
from lowcomm.diloco._outer_comm import AllReduceHandle, OuterComm
from lowcomm.diloco._rules import dynamic_local_steps
from lowcomm.diloco._stats import OuterStats
from lowcomm.diloco.config import OuterConfig
from lowcomm.errors import LowcommError

__all__ = [
    "TAG_CONTROL",
    "TAG_DELTA",
    "TAG_FRAGMENT",
    "Flight",
    "PseudogradientReducer",
    "Settled",
    "SpeedControl",
]

logger = logging.getLogger(__name__)

# Tags keep the concurrent all-reduces of one peer apart (several may be in flight).
TAG_DELTA = 1
TAG_CONTROL = 2
TAG_FRAGMENT = 16  # + fragment index


class Settled:
    """A handle whose all-reduce has completed (restored from a checkpoint, or settled)."""

    def wait(self, *, timeout_s: float | None = None) -> None:
        return None


class Flight:
    """One pseudo-gradient all-reduce: its handle (None: it failed to start), the buffer that
    receives the average, and this peer's own contribution (kept for eager, retries and drops)."""

    def __init__(
        self,
        handle: AllReduceHandle | None,
        buf: torch.Tensor,
        sent: torch.Tensor,
        stamp: dict[str, int] | None = None,
    ) -> None:
        self.handle = handle
        self.buf = buf
        self.sent = sent
        self.stamp = stamp  # the outer state it was launched at (a retry sends the same)


class PseudogradientReducer:
    """Averages pseudo-gradients over ``comm`` in the configured wire format, retrying or dropping.

    Owns the codec and, for top-k, the error feedback (this peer's residuals, part of its local
    state). Updates ``stats`` (bytes, time blocked, retried and dropped rounds). Training thread only.

    Every all-reduce carries ``stamp()`` (outer step and shared-state revision): the master refuses
    one whose participants are at different outer states on all of them, and ``complete`` raises
    that ``StaleStateError`` instead of retrying or dropping (the trainer resyncs).
    """

    def __init__(
        self,
        comm: OuterComm,
        config: OuterConfig,
        stats: OuterStats,
        stamp: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.comm = comm
        self.config = config
        self.stats = stats
        self.stamp = stamp
        self.quantization: Any = None if config.quantization == "none" else config.quantization
        self.error_feedback: ErrorFeedback | None = None
        if config.quantization == "topk":
            # Top-k drops most of each pseudo-gradient: error feedback re-sends what was left
            # out in later rounds (mandatory: docs/algorithms.md section 6). It covers this peer's
            # own compression; the ring re-sparsifies partial sums with the same codec.
            codec = get_codec("topk", fraction=config.topk_fraction)
            self.error_feedback = ErrorFeedback(codec)
            self.quantization = codec

    def launch(self, delta: torch.Tensor, tag: int) -> Flight:
        """Starts averaging ``delta`` (which then receives the average) under ``tag``."""
        sent = delta.clone()
        if self.error_feedback is not None:
            ef = self.error_feedback
            kept = ef.decode(ef.encode(f"tag{tag}", delta)).to(torch.float32)
            delta.copy_(kept)
            sent = kept.clone()
        stamp = None if self.stamp is None else self.stamp()
        handle = self._start(delta, tag, stamp)
        return Flight(handle, delta, sent, stamp)

    def _start(
        self, buf: torch.Tensor, tag: int, stamp: dict[str, int] | None
    ) -> AllReduceHandle | None:
        try:
            return self.comm.all_reduce_async(
                buf,
                "avg",
                quantization=self.quantization,
                tag=tag,
                timeout_s=self.config.timeout_s,
                stamp=stamp,
                # A NaN/inf pseudo-gradient fails the round on every peer (NonFiniteError, seen
                # at the gate) instead of poisoning everyone's average: the round is dropped.
                check_finite=True,
            )
        except LowcommError as exc:
            logger.warning(
                "outer step %d: starting the all-reduce failed: %s", self.stats.outer_steps, exc
            )
            return None

    def complete(self, flight: Flight, *, timeout_s: float) -> torch.Tensor | None:
        """Waits for an all-reduce; retries among survivors or drops. Returns the average or None.

        ``timeout_s`` is not used: every operation carries the timeout it was started with.
        """
        attempts = self.config.max_retries if self.config.on_failure == "retry" else 0
        handle = flight.handle
        for attempt in range(attempts + 1):
            if handle is not None:
                t0 = time.perf_counter()
                try:
                    info = handle.wait(timeout_s=None)  # the operation has its own timeout
                except StaleStateError:
                    raise  # retrying cannot help: the trainer resyncs the outer state
                except NonFiniteError as exc:
                    # Retrying would send the same poison: drop the round at once.
                    logger.warning("outer step %d: %s", self.stats.outer_steps, exc)
                    break
                except LowcommError as exc:
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
                handle = self._start(flight.buf, TAG_DELTA, flight.stamp)
        # Dropped: no outer step. The caller keeps this peer's progress for the next round.
        self.stats.dropped_rounds += 1
        logger.warning(
            "outer step %d dropped; local progress kept for the next round", self.stats.outer_steps
        )
        return None

    def settle(self, flight: Flight, *, timeout_s: float) -> Flight | None:
        """Completes ``flight`` now: a ``Settled`` flight holding the average, or None if the
        round was dropped (then the caller decides what happens to ``flight.sent``)."""
        if isinstance(flight.handle, Settled):
            return flight
        if self.complete(flight, timeout_s=timeout_s) is None:
            return None
        return Flight(Settled(), flight.buf, flight.sent)

    def reduce_now(self, delta: torch.Tensor, tag: int) -> torch.Tensor | None:
        """``launch`` then ``complete``: the average, or None for a dropped round."""
        return self.complete(self.launch(delta, tag), timeout_s=self.config.timeout_s)

    def peers_pending(self) -> bool:
        """Asks the master whether peers wait to join; every peer gets the same answer.

        Called only where no all-reduce of ours is in flight: the real communicator runs its
        collectives in order on one thread, so asking behind an in-flight all-reduce would wait
        for it. A failure to ask counts as "nobody pending" (it fails on every peer alike).
        """
        t0 = time.perf_counter()
        try:
            return bool(self.comm.are_peers_pending(timeout_s=self.config.timeout_s))
        except LowcommError as exc:
            logger.warning("are_peers_pending failed: %s", exc)
            return False
        finally:
            self.stats.comm_wait_s += time.perf_counter() - t0


class SpeedControl:
    """DyLU (``config.dynamic_local_steps``): how many inner steps this peer runs per round.

    Each round's speed is the round's inner steps over its wall time (forward, backward and
    optimizer, everything between outer steps) minus the time ``step()`` spent blocked on the
    network. A tiny max-reduce of it is started at the end of a round and read at the next outer
    step, so the update uses speeds one round old. Without DyLU, ``local_steps`` stays
    ``sync_every`` and nothing is reduced. Training thread only.
    """

    def __init__(self, comm: OuterComm, config: OuterConfig, stats: OuterStats) -> None:
        self.comm = comm
        self.config = config
        self.stats = stats
        self.local_steps = config.sync_every
        self.last_speed = 0.0
        self._control: tuple[AllReduceHandle, torch.Tensor] | None = None
        self.restart_round()

    def restart_round(self) -> None:
        """Marks the start of a round's inner steps (at construction and after each outer step)."""
        self._round_start = time.perf_counter()
        self._round_wait_start = self.stats.comm_wait_s

    def round_speed(self, round_steps: int) -> float:
        """This round's inner steps per second of compute (0 if none measured)."""
        now = time.perf_counter()
        compute_s = (now - self._round_start) - (self.stats.comm_wait_s - self._round_wait_start)
        # Rounded as it travels (fp32), so that the fastest peer sees exactly its own speed.
        return float(torch.tensor(round_steps / compute_s if compute_s > 0 else 0.0).float())

    def start(self, speed: float) -> None:
        """Launches the max-reduce of this round's speed, read by the next ``wait``."""
        if not self.config.dynamic_local_steps:
            return
        buf = torch.tensor([speed], dtype=torch.float32)
        try:
            handle = self.comm.all_reduce_async(
                buf, "max", quantization=None, tag=TAG_CONTROL, timeout_s=self.config.timeout_s
            )
        except LowcommError as exc:
            logger.warning("speed all-reduce failed to start: %s", exc)
            return
        self._control = (handle, buf)

    def wait(self) -> float:
        """The fastest peer's speed from the last round's control reduce (0 if none or failed)."""
        if self._control is None:
            return 0.0
        handle, buf = self._control
        self._control = None
        t0 = time.perf_counter()
        try:
            handle.wait(timeout_s=None)
        except LowcommError as exc:
            # Every peer sees the same failure of this collective, so all skip the same update.
            logger.warning("speed all-reduce failed: %s", exc)
            return 0.0
        finally:
            self.stats.comm_wait_s += time.perf_counter() - t0
        return float(buf[0].item())

    def update(self, own_speed: float, max_speed: float) -> None:
        """Sets next round's ``local_steps`` from last round's speeds, then remembers this one's."""
        cfg = self.config
        if cfg.dynamic_local_steps and max_speed > 0 and self.last_speed > 0:
            # DyLU from last round's speeds (the control reduce is one round behind).
            self.local_steps = dynamic_local_steps(
                cfg.sync_every,
                own_speed=self.last_speed,
                max_speed=max(max_speed, self.last_speed),
                min_steps=cfg.min_local_steps,
            )
        self.last_speed = own_speed
