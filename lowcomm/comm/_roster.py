"""The roster of a run as the master sees it: who registered, who is accepted or pending, the
world view handed to peers, and admission of a peer or a whole replica. ``Membership`` (the state
machine of phases, votes and evictions) builds on it; every method here expects the caller to hold
``cond``, except ``snapshot`` and ``wake``."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

from lowcomm.comm._admission import admission_of, pending_replicas
from lowcomm.comm._peers import PeerRecord
from lowcomm.comm._protocol import ErrorCode
from lowcomm.comm._rounds import RoundTable

__all__ = ["ADMIT_GRACE_S", "Roster"]

logger = logging.getLogger(__name__)

# A pending peer that has not polled for this long is not admitted (it stalled before admission).
ADMIT_GRACE_S = 2.0


class Roster:
    """The registered peers of one run and the counters every phase reads (see the module
    docstring). Thread-safe through ``cond``.

    Args:
        epoch: this master process's epoch (ring and op ids include it).
        config_blob: the run's configuration, handed to every peer at registration.
        heartbeat_timeout_s: a peer silent for this long is evicted (by ``expire``).
        first_peer_grace_s: how long after start a fresh peer waits before it may found the world
            (peers of a restarted master re-register within it).
    """

    def __init__(
        self,
        *,
        epoch: str,
        config_blob: bytes,
        heartbeat_timeout_s: float,
        first_peer_grace_s: float = 0.0,
    ) -> None:
        self.epoch = epoch
        self._started_at = time.monotonic()
        self._first_peer_grace_s = first_peer_grace_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._config_blob = config_blob
        self.cond = threading.Condition()
        self._peers: dict[str, PeerRecord] = {}
        self._evicted: dict[str, str] = {}  # peer_id -> reason
        self._rounds = RoundTable(epoch)
        self._ring_gen: dict[int, int] = {}
        self._revision = 0
        self._join_seq = itertools.count()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of membership, for logs and tests."""
        with self.cond:
            return {
                "epoch": self.epoch,
                "revision": self._revision,
                "accepted": [p.peer_id for p in self._accepted()],
                "pending": [p.peer_id for p in self._peers.values() if not p.accepted],
                "evicted": dict(self._evicted),
                "waiting": {p.peer_id: p.gate.describe() for p in self._peers.values() if p.gate},
            }

    def wake(self) -> None:
        """Wakes every waiting operation (the master is stopping)."""
        with self.cond:
            self.cond.notify_all()

    def _known_peer(self, peer_id: str) -> PeerRecord | dict[str, Any]:
        peer = self._peers.get(peer_id)
        if peer is not None:
            return peer
        if peer_id in self._evicted:
            return {
                "error": ErrorCode.EVICTED,
                "message": f"peer {peer_id} was evicted: {self._evicted[peer_id]}",
            }
        return self._unknown(peer_id)

    def _unknown(self, peer_id: str) -> dict[str, Any]:
        return {
            "error": ErrorCode.UNKNOWN_PEER,
            "epoch": self.epoch,
            "message": f"master (epoch {self.epoch}) does not know peer {peer_id}",
        }

    def _status_of(self, peer: PeerRecord) -> dict[str, Any]:
        status = {"accepted": peer.accepted, "epoch": self.epoch, **self._world()}
        if not peer.accepted:
            replica = self._replica_ranks(peer.replica_id)
            status["admission"] = admission_of(peer, replica, self._admissible)
        return status

    def _world(self) -> dict[str, Any]:
        return {
            "revision": self._revision,
            "world": [
                {
                    "peer_id": p.peer_id,
                    "peer_group": p.peer_group,
                    "address": list(p.address),
                    "join_seq": p.join_seq,
                    "replica_id": p.replica_id,
                    "replica_rank": p.replica_rank,
                    "num_replica_ranks": p.num_replica_ranks,
                }
                for p in self._accepted()
            ],
            "pending_replicas": pending_replicas(list(self._peers.values())),
        }

    def _accepted(self, group: int | None = None) -> list[PeerRecord]:
        peers = [
            p
            for p in self._peers.values()
            if p.accepted and (group is None or p.peer_group == group)
        ]
        return sorted(peers, key=lambda p: (p.join_seq, p.peer_id))

    def _first_peer_due(self) -> bool:
        """Whether a fresh peer may be accepted unasked: the world is empty and this master has
        been up long enough that an earlier master's peers would have re-registered (else a
        joiner arriving just after a restart would start a world of its own, out of step)."""
        if self._accepted():
            return False
        return time.monotonic() - self._started_at >= self._first_peer_grace_s

    def _admissible(self, peer: PeerRecord) -> bool:
        """A pending peer that is waiting in connect() right now (or polled a moment ago)."""
        if peer.accepted or peer.ghost:
            return False
        return peer.polling > 0 or time.monotonic() - peer.last_poll < ADMIT_GRACE_S

    def _bump(self, group: int) -> None:
        self._ring_gen[group] = self._ring_gen.get(group, 0) + 1

    def _replica_ranks(self, replica_id: str) -> list[PeerRecord]:
        return sorted(
            (p for p in self._peers.values() if p.num_replica_ranks and p.replica_id == replica_id),
            key=lambda p: p.replica_rank,
        )

    def _admit(self, admitted: list[PeerRecord]) -> None:
        for p in admitted:
            p.accepted = True
            p.join_seq = next(self._join_seq)
            self._bump(p.peer_group)
        if admitted:
            self._revision += 1
            logger.info(
                "master: admitted %s at revision %d",
                ", ".join(p.peer_id for p in admitted),
                self._revision,
            )
