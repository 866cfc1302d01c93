"""What the master knows of one peer: its record (membership, identity, latest report) and the
gate it waits at. Plain data; ``Membership`` holds the lock that guards it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowcomm.comm._protocol import GateKind, OpReport

__all__ = ["Arrival", "PeerRecord"]


@dataclass
class Arrival:
    """A peer waiting at a gate."""

    kind: GateKind
    group: int
    key: str
    rid: str
    payload: dict[str, Any]
    nonfinite: bool = False

    def signature(self) -> tuple[GateKind, int, str]:
        group = -1 if self.kind.world_scoped else self.group
        return (self.kind, group, self.key)

    def describe(self) -> str:
        if self.kind == GateKind.ALL_REDUCE:
            return f"all_reduce(tag={self.key}, peer_group={self.group})"
        if self.kind == GateKind.SYNC:
            return f"sync_shared_state(peer_group={self.group})"
        if self.kind == GateKind.VOTE:
            return f"vote({self.key!r})"
        if self.kind == GateKind.PENDING:
            return "are_peers_pending()"
        return "update_topology()"


@dataclass
class PeerRecord:
    """What the master knows of one registered peer."""

    peer_id: str
    peer_group: int
    address: tuple[str, int]
    accepted: bool
    join_seq: int
    last_seen: float
    ghost: bool = False  # known from a re-registering peer after a restart, not yet back
    returning: bool = False  # pending with an earlier master: it never founds a world itself
    # A pending peer is admitted only while it is visibly waiting in connect(): a joiner that
    # stalled or died before admission must not make the running peers wait for it.
    polling: int = 0
    last_poll: float = 0.0
    gate: Arrival | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # rid -> response
    secret: str = ""  # issued at registration; every later request must present it
    last_op: OpReport | None = None  # its latest all-reduce, as it reported at registration
    # A lockstep failure of its scope while it was not waiting: its next gate arrival gets it.
    lockstep: dict[str, Any] | None = None
    # Rank ``replica_rank`` of the ``num_replica_ranks`` ranks of replica ``replica_id`` (0: alone).
    replica_id: str = ""
    replica_rank: int = 0
    num_replica_ranks: int = 0
