"""The master's rules for admitting replicas as one unit and for refusing stale all-reduces.

A peer registered as rank r of a replica of n ranks (a torchrun job, one peer per FSDP shard) is
admitted only together with the other n - 1: at one ``update_topology`` gate every rank of the
replica is accepted, or none is (the first replica of an empty run: as soon as its last rank
registers). When one rank of an accepted or pending replica is evicted (dead, silent, left), the
others are evicted with it, with a reason naming the lost rank, so no rank of a half replica trains
on. A new process registering a (replica, rank) still known replaces the old incarnation: the
whole old replica is evicted first.

Pure functions over the master's peer records (``_membership.PeerRecord``), called with its lock
held: which pending peers one ``update_topology`` admits (every rank of a replica, or none), how
a pending peer's wait reads in words, and the stamp check that refuses an all-reduce between peers
at different outer steps or shared-state revisions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from lowcomm.comm._protocol import ErrorCode, RegisterRequest, WorldEntry

__all__ = [
    "LEAVES_AS_A_WHOLE",
    "Member",
    "admissible_units",
    "admission_of",
    "copy_replica_fields",
    "describe",
    "is_complete",
    "pending_replicas",
    "registration_conflict",
    "stale_stamps",
]

logger = logging.getLogger(__name__)


class Member(Protocol):
    """What these rules read of a peer record."""

    peer_id: str
    accepted: bool
    replica_id: str
    replica_rank: int
    num_replica_ranks: int


M = TypeVar("M", bound=Member)

LEAVES_AS_A_WHOLE = (
    "the replica leaves as a whole: restart all of its ranks (torchrun does, with --max-restarts)"
)


def unit(peer: Member) -> str:
    """The admission unit: the replica id, or the peer itself when it is on its own."""
    return f"replica:{peer.replica_id}" if peer.num_replica_ranks else f"peer:{peer.peer_id}"


def describe(peer: Member) -> str:
    """``rank 1 (peer ab12) of replica 'r0' (2 ranks)``, or ``peer ab12`` on its own."""
    if not peer.num_replica_ranks:
        return f"peer {peer.peer_id}"
    return (
        f"rank {peer.replica_rank} (peer {peer.peer_id}) of replica {peer.replica_id!r} "
        f"({peer.num_replica_ranks} ranks)"
    )


def copy_replica_fields(peer: Member, req: RegisterRequest | WorldEntry) -> None:
    """Records the replica a registration (or a remembered world entry) names on a record."""
    peer.replica_id = req.replica_id
    peer.replica_rank = req.replica_rank
    peer.num_replica_ranks = req.num_replica_ranks


def is_complete(replica: Sequence[Member]) -> bool:
    """Every rank 0..n-1 of the replica has registered."""
    return bool(replica) and {p.replica_rank for p in replica} == set(
        range(replica[0].num_replica_ranks)
    )


def registration_conflict(req: RegisterRequest, replica: Sequence[M]) -> tuple[str, list[M]]:
    """What a registration does to its replica's other known ranks (``replica``): an error
    message refusing it ("" if none), and the records it replaces. A new process for a (replica,
    rank) still known is a restart of that replica: its old incarnation is evicted as a whole."""
    if not req.num_replica_ranks:
        return "", []
    replaced = []
    for other in replica:
        if other.peer_id == req.peer_id:
            continue
        if other.num_replica_ranks != req.num_replica_ranks:
            return (
                f"rank {req.replica_rank} of replica {req.replica_id!r} registers with "
                f"{req.num_replica_ranks} ranks but {describe(other)} is already registered: "
                "start every rank of a replica with the same number of ranks (torchrun "
                "--nproc-per-node), and give each replica its own replica id",
                [],
            )
        if other.replica_rank == req.replica_rank:
            replaced.append(other)
    return "", replaced


def admissible_units(peers: Sequence[M], admissible: Callable[[M], bool]) -> list[M]:
    """The pending peers the next ``update_topology`` admits: each admissible peer on its own,
    and each replica whose every rank has registered and is admissible (all or none)."""
    units: dict[str, list[M]] = {}
    for p in peers:
        units.setdefault(unit(p), []).append(p)
    admitted: list[M] = []
    for members in units.values():
        if any(p.accepted for p in members):
            continue  # lone accepted peers; an accepted replica is not admitted twice
        if members[0].num_replica_ranks and not is_complete(members):
            continue  # a rank has not registered yet
        if all(admissible(p) for p in members):
            admitted.extend(sorted(members, key=lambda p: p.replica_rank))
    return admitted


def pending_replicas(peers: Sequence[Member]) -> dict[str, dict[str, Any]]:
    """Replicas with pending ranks: ``{replica_id: {"num_ranks": n, "ranks": [registered]}}``."""
    out: dict[str, dict[str, Any]] = {}
    for p in peers:
        if p.num_replica_ranks and not p.accepted:
            entry = out.setdefault(p.replica_id, {"num_ranks": p.num_replica_ranks, "ranks": []})
            entry["ranks"] = sorted([*entry["ranks"], p.replica_rank])
    return out


def admission_of(peer: M, replica: Sequence[M], admissible: Callable[[M], bool]) -> str:
    """Why pending ``peer`` is not admitted yet, in words (``replica``: its replica's ranks)."""
    waiting = "waiting for the running peers to call update_topology()"
    if not peer.num_replica_ranks:
        return waiting
    size = peer.num_replica_ranks
    missing = sorted(set(range(size)) - {p.replica_rank for p in replica})
    if missing:
        return (
            f"replica {peer.replica_id!r} has {len(replica)} of {size} ranks registered (missing "
            f"ranks {missing}); a replica is admitted only once all of its ranks have registered"
        )
    stalled = [p.replica_rank for p in replica if not admissible(p)]
    if stalled:
        return f"replica {peer.replica_id!r}: ranks {stalled} registered but stopped polling"
    return f"replica {peer.replica_id!r} is complete; {waiting}"


def stale_stamps(
    scope: Sequence[Member], payloads: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]] | None:
    """The answers refusing an all-reduce whose participants sent different ``stamp``s (for the
    outer loops: outer step and shared-state revision), or None when they agree (or none sent
    one). Nobody may average with a peer at another state: every participant is refused."""
    stamps = {pid: payload.get("stamp") for pid, payload in payloads.items()}
    if all(v is None for v in stamps.values()):
        return None
    clean: dict[str, dict[str, int]] = {}
    for pid, stamp in stamps.items():
        if stamp is not None and not (
            isinstance(stamp, dict)
            and all(isinstance(k, str) and type(v) is int for k, v in stamp.items())
        ):
            msg = (
                f"peer {pid} sent an all_reduce stamp that is not an object of integers: {stamp!r}"
            )
            return {p.peer_id: {"error": ErrorCode.MISMATCH, "message": msg} for p in scope}
        clean[pid] = dict(stamp or {})
    if len({tuple(sorted(v.items())) for v in clean.values()}) == 1:
        return None
    who = {p.peer_id: p for p in scope}
    listed = "; ".join(
        f"{describe(who[pid]) if pid in who else pid} at {stamp or 'no stamp'}"
        for pid, stamp in clean.items()
    )
    msg = (
        f"all_reduce refused on every participant: they are at different states ({listed}); "
        "nothing was averaged. The peers behind must take the newest state (sync_shared_state "
        "receive_only) before they average again"
    )
    logger.warning("master: %s", msg)
    return {
        p.peer_id: {"error": ErrorCode.STALE, "message": msg, "stamps": clean, "peer_id": p.peer_id}
        for p in scope
    }
