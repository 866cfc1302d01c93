"""Runtime failures of the collective layer: each class says what happened and what to do next.

Every class derives from ``CommError`` (itself a ``LowcommError``), so ``except CommError`` catches
everything the network can do to a caller. Timeouts are also ``TimeoutError``s and lost peers also
``ConnectionError``s. Bad arguments raise ``ValueError`` instead.
"""

from __future__ import annotations

from lowcomm.errors import LowcommConnectionError, LowcommError, LowcommTimeoutError

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "CommError",
    "CommTimeoutError",
    "NonFiniteError",
    "PeerFailureError",
    "ProtocolError",
    "StaleStateError",
    "TopologyError",
    "TruncatedFrameError",
]


class CommError(LowcommError):
    """Base of every runtime failure in ``lowcomm.comm``."""


class ProtocolError(CommError):
    """A peer sent something that is not a valid lowcomm frame: bad magic, another wire version,
    a length over the bound, an unexpected kind or tag (peers running different operations), or a
    payload that does not parse. The connection it came on has been closed."""


class AuthenticationError(CommError):
    """The other side does not know this run's token (HMAC challenge-response failed), or only one
    side uses a token. Check that every process of the run was given the same token."""


class CommTimeoutError(CommError, LowcommTimeoutError):
    """An operation ran past its ``timeout_s``: a peer stopped responding (stalled, SIGSTOPped, or
    its link is far slower than the timeout allows). Retry with the survivors or raise the timeout."""


class PeerFailureError(CommError, LowcommConnectionError):
    """A peer died, reset its connection or aborted mid-operation. Nothing partial was applied;
    retry the operation with the surviving peers."""


class TruncatedFrameError(PeerFailureError, ProtocolError):
    """The peer closed its connection in the middle of a frame. It is both a peer failure (the
    usual cause is a dead process: retry with the survivors) and a protocol error (the frame is
    incomplete), so either ``except`` clause catches it."""


class TopologyError(CommError):
    """The peers are out of lockstep: different phases, a changed world, or this peer was not
    accepted. Call ``update_topology()`` on every peer and retry."""


class StaleStateError(TopologyError):
    """The participants of an all-reduce are at different states: their ``stamp`` arguments (for
    the outer loops: outer step and shared-state revision) differ. Refused on every participant
    before any data moved, so nothing was averaged. ``stamps`` maps each participant's peer id to
    its stamp; ``behind(peer_id)`` tells whether that peer is below the newest stamp, and must take
    the newer peers' state (``sync_shared_state(..., "receive_only")``) before averaging again."""

    def __init__(
        self,
        message: str,
        *,
        stamps: dict[str, dict[str, int]] | None = None,
        mine: str | None = None,
    ) -> None:
        super().__init__(message)
        self.stamps: dict[str, dict[str, int]] = dict(stamps or {})
        self.mine = mine  # the peer id of the participant that raised it

    @staticmethod
    def order(stamp: dict[str, int]) -> tuple[int, ...]:
        """A stamp as a sortable tuple (its values in key order)."""
        return tuple(int(stamp[k]) for k in sorted(stamp))

    def newest(self) -> tuple[int, ...]:
        """The newest stamp among the participants, as ``order`` gives it."""
        return max((self.order(s) for s in self.stamps.values()), default=())

    @property
    def is_behind(self) -> bool:
        """True if the participant that raised it is behind (unknown ``mine``: False)."""
        return self.mine is not None and self.behind(self.mine)

    def behind(self, peer_id: str) -> bool:
        """True if ``peer_id``'s stamp is older than the newest one (it must resync)."""
        stamp = self.stamps.get(peer_id)
        return stamp is not None and self.order(stamp) < self.newest()


class BackendUnavailableError(CommError, ImportError):
    """The requested backend cannot run here (for PCCL: ``pypccl`` missing, or its native library
    needs a newer glibc or Python). The message says why; use ``backend="tcp"``, which runs
    wherever PyTorch does."""


class NonFiniteError(CommError):
    """A participant's contribution to an all-reduce holds NaN or inf (the message names the
    peer): nothing was applied on any peer. Not a peer failure, so retries do not repeat it; an
    outer loop drops the round (and the peer should find out why its update diverged)."""
