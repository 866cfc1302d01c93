"""The master's vote-decided operations: an all-reduce's commit vote and a shared-state sync round.

A ``Round`` has participants, their votes and a verdict. A commit vote (``GateKind.ALL_REDUCE``)
commits only if every participant voted ok; any fail, or a participant lost before it voted ok,
aborts it on everyone. A sync round (``GateKind.SYNC``) is ``"done"`` once every live participant
reported; one lost meanwhile simply leaves it. The methods that change a round return True when
they just aborted a commit vote: the master then bumps the group's ring generation, so every
participant drops its ring and reconnects. Not thread-safe: ``Membership`` holds its lock.

**After a master restart** the new master knows no round, but the peers still hold theirs: each
keeps its finished result until it hears the verdict and tells every master it registers with
where it stands in its latest all-reduce (``OpReport``: running, holding, failed, committed,
aborted). A vote for an unknown operation *adopts* it (``RoundTable.adopt``, with the
participants the vote names) and ``Round.resolve`` decides it from the reports:

- a participant reports ``committed`` -> commit (the old master had decided so; everyone who
  holds the result applies it);
- a participant provably never voted ok (running, failed, aborted, or it never saw the
  operation) -> abort (the old master cannot have committed);
- otherwise every participant that came back holds the result: wait for the rest (ghosts are
  evicted after the heartbeat timeout), then abort: nobody applied it.

So the outcome is all-or-nothing among the survivors whatever message the master died at.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from lowcomm.comm._peers import PeerRecord
from lowcomm.comm._protocol import GateKind, OpState

__all__ = ["AWAY", "UNSEEN", "Round", "RoundTable"]

# ``Round.resolve``: a participant that has not re-registered yet (it may have committed), and one
# that is back but never saw the operation (its gate answer was lost: it cannot have voted).
AWAY = "away"
UNSEEN = "unseen"
_NEVER_OK = frozenset({OpState.RUNNING, OpState.FAILED, OpState.ABORTED, UNSEEN})

# Kept round records; older decided ones are forgotten.
_MAX_ROUNDS = 4096


@dataclass
class Round:
    """One commit vote or sync round (see the module docstring)."""

    op_id: str
    kind: GateKind  # ALL_REDUCE | SYNC
    group: int
    participants: list[str]
    votes: dict[str, bool] = field(default_factory=dict)
    verdict: str | None = None  # "commit" | "abort" for all_reduce; "done" for sync
    reason: str = ""
    adopted: bool = False  # an operation of an earlier master, resolved from the peers' reports

    def state_of(self, peer_id: str, peer: PeerRecord | None) -> str | None:
        """``peer_id``'s state for ``resolve``: its vote to this master, else its report."""
        if peer_id in self.votes:
            return OpState.HOLDING if self.votes[peer_id] else OpState.FAILED
        if peer is None:
            return None  # evicted: it no longer matters what it did
        if peer.ghost:
            return AWAY
        if peer.last_op is None or peer.last_op.op_id != self.op_id:
            return UNSEEN
        return str(peer.last_op.state)

    def resolve(self, states: Mapping[str, str | None]) -> bool:
        """Decides an adopted round from each participant's state (an ``OpState`` value, ``AWAY``,
        ``UNSEEN``, or None: evicted, it no longer matters); see the module docstring.
        Returns True if it just aborted."""
        if self.verdict is not None:
            return False
        named = {p: states.get(p) for p in self.participants}
        if any(s == OpState.COMMITTED for s in named.values()):
            self.verdict = "commit"
            self.reason = "a participant had committed it before the master restarted"
            return False
        never = [p for p, s in named.items() if s in _NEVER_OK]
        if never:
            return self._decide(
                failed_by=never[0], why="it had not finished before the master restarted"
            )
        if any(s == AWAY for s in named.values()):
            return False
        self.verdict = "abort"
        self.reason = (
            "the master restarted before any participant learnt the verdict; nobody applied it"
        )
        return True

    def missing(self) -> list[str]:
        """Participants that have not voted (reported) yet."""
        return [p for p in self.participants if p not in self.votes]

    def vote(self, peer_id: str, ok: bool) -> bool:
        """A commit vote's first vote by ``peer_id`` (later ones are ignored)."""
        if peer_id in self.votes:
            return False
        self.votes[peer_id] = ok
        return self._decide(failed_by=None if ok else peer_id)

    def report(self, peer_id: str, ok: bool) -> None:
        """A sync participant is finished (``ok``: it got or served the state)."""
        self.votes.setdefault(peer_id, ok)
        self._decide_sync()

    def abandon(self, peer_id: str, why: str) -> bool:
        """``peer_id`` gave up (timed out, moved on) before voting: it counts as a failed vote."""
        if self.verdict is not None or peer_id not in self.participants or peer_id in self.votes:
            return False
        self.votes[peer_id] = False
        if self.kind == GateKind.ALL_REDUCE:
            return self._decide(failed_by=peer_id, why=why)
        self._decide_sync()
        return False

    def lose(self, peer_id: str, reason: str) -> bool:
        """``peer_id`` was evicted: a commit vote aborts unless it had voted ok; a sync round goes
        on without it."""
        if self.verdict is not None or peer_id not in self.participants:
            return False
        if self.kind == GateKind.ALL_REDUCE:
            if peer_id not in self.votes or not self.votes[peer_id]:
                return self._decide(failed_by=peer_id, why=reason)
            # It voted ok before dying: the others may still commit.
            return self._decide(failed_by=None)
        self.participants.remove(peer_id)
        self.votes.pop(peer_id, None)
        self._decide_sync()
        return False

    def _decide(self, *, failed_by: str | None, why: str = "it reported a failure") -> bool:
        if self.verdict is not None:
            return False
        if failed_by is not None:
            self.verdict = "abort"
            self.reason = f"peer {failed_by} failed this all-reduce: {why}"
            return True
        if all(self.votes.get(p) for p in self.participants):
            self.verdict = "commit"
        return False

    def _decide_sync(self) -> None:
        if self.verdict is None and all(p in self.votes for p in self.participants):
            self.verdict = "done"


class RoundTable:
    """The rounds of one master process, by op id (``"<epoch>-<n>"``), with bounded retention.

    ``undecided`` lists only the rounds without a verdict: the master walks them on every gate
    arrival, vote and eviction, and walking every kept round instead (up to ``_MAX_ROUNDS``)
    made each request's cost grow with the run's history."""

    def __init__(self, epoch: str) -> None:
        self._epoch = epoch
        self._seq = itertools.count()
        self._rounds: dict[str, Round] = {}
        self._undecided: dict[str, Round] = {}

    def new(self, kind: GateKind, group: int, participants: list[str]) -> Round:
        r = Round(
            op_id=f"{self._epoch}-{next(self._seq)}",
            kind=kind,
            group=group,
            participants=participants,
        )
        self._rounds[r.op_id] = self._undecided[r.op_id] = r
        if len(self._rounds) > _MAX_ROUNDS:
            for old in list(itertools.islice(self._rounds, len(self._rounds) - _MAX_ROUNDS)):
                if self._rounds[old].verdict is not None:
                    del self._rounds[old]
        return r

    def adopt(self, op_id: str, group: int, participants: list[str]) -> Round:
        """An operation of an earlier master, named by a participant's vote (see module doc)."""
        r = Round(
            op_id=op_id,
            kind=GateKind.ALL_REDUCE,
            group=group,
            participants=list(participants),
            adopted=True,
        )
        self._rounds[op_id] = self._undecided[op_id] = r
        return r

    def get(self, op_id: str) -> Round | None:
        return self._rounds.get(op_id)

    def undecided(self) -> list[Round]:
        """The rounds without a verdict yet, oldest first (a copy: callers decide rounds)."""
        for op_id in [k for k, r in self._undecided.items() if r.verdict is not None]:
            del self._undecided[op_id]
        return list(self._undecided.values())
