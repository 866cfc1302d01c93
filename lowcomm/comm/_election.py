"""The shared-state election, master half: which state a sync round agrees on and who serves it.

Each participant of a ``sync_shared_state`` gate sends a payload: its ``strategy``, its state's
``revision`` and ``state_hash``, the per-tensor ``hashes`` and the tensors' ``meta`` (dtype,
shape). ``elect`` picks the state: that of the ``send_only`` peers if any (they must agree), else
the most popular ``(revision, state_hash)`` among the ``enforce_popular`` peers (ties: the higher
revision, then the hash, so every master decides the same). ``receive_only`` peers never vote.
``plans`` then tells each participant what to fetch (the tensors whose hash differs) and from whom.
The peer half (fetching, verifying, serving) is ``lowcomm.comm.shared_state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Election", "ElectionError", "elect", "plans"]


class ElectionError(Exception):
    """No state can be agreed on; the message says why (every participant gets it)."""


@dataclass(frozen=True)
class Election:
    """The chosen state: its ``(revision, state_hash)``, the peers holding it, its payload."""

    winner: tuple[int, str]
    sources: list[str]
    reference: dict[str, Any]


def _state_key(payload: dict[str, Any]) -> tuple[int, str]:
    return int(payload["revision"]), str(payload["state_hash"])


def elect(payloads: dict[str, dict[str, Any]]) -> Election:
    """Chooses the state from every participant's payload (see the module docstring).

    Raises:
        ElectionError: every participant is ``receive_only``, or the ``send_only`` ones disagree.
    """
    senders = [pid for pid, pl in payloads.items() if pl["strategy"] == "send_only"]
    voters = senders or [pid for pid, pl in payloads.items() if pl["strategy"] == "enforce_popular"]
    if not voters:
        raise ElectionError(
            "no peer can provide the shared state: every peer of the group is receive_only"
        )
    counts: dict[tuple[int, str], int] = {}
    for pid in voters:
        counts[_state_key(payloads[pid])] = counts.get(_state_key(payloads[pid]), 0) + 1
    if senders and len(counts) > 1:
        raise ElectionError(f"send_only peers disagree on the shared state: {sorted(counts)}")
    # Most popular; ties go to the higher revision, then the hash (deterministic).
    winner = max(counts, key=lambda k: (counts[k], k[0], k[1]))
    sources = [pid for pid in voters if _state_key(payloads[pid]) == winner]
    return Election(winner=winner, sources=sources, reference=payloads[sources[0]])


def plans(
    election: Election,
    payloads: dict[str, dict[str, Any]],
    addresses: dict[str, tuple[str, int]],
    *,
    op_id: str,
) -> dict[str, dict[str, Any]]:
    """Each participant's answer to its sync gate: what it needs, who serves it, what to verify."""
    reference = election.reference
    results: dict[str, dict[str, Any]] = {}
    for pid, payload in payloads.items():
        if payload["strategy"] == "send_only" or _state_key(payload) == election.winner:
            need: list[str] = []
        else:
            need = sorted(
                name for name, h in reference["hashes"].items() if payload["hashes"].get(name) != h
            )
        results[pid] = {
            "status": "open",
            "op_id": op_id,
            "state_revision": election.winner[0],
            "state_hash": election.winner[1],
            "hashes": reference["hashes"],
            "meta": reference["meta"],
            "need": need,
            "sources": [
                {"peer_id": s, "address": list(addresses[s])} for s in election.sources if s != pid
            ],
            "is_source": pid in election.sources,
        }
    return results
