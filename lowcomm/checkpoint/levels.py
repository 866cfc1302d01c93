"""``StorageLevel``: the verbs every checkpoint level implements (host memory, local disk, remote).

The ``Checkpointer`` lists, restores and prunes every level through these verbs alone, fastest
level first; its background pipeline calls ``write`` on each level a save asks for. The levels:
``HostLevel`` (the newest snapshot kept in RAM), ``LocalLevel`` (plain files under a directory),
``RemoteLevel`` (any fsspec URL, uploaded from the local files).

Commit contract, the same at every level: a step exists at a level once its manifest (the marker,
written last) is there; ``steps()`` lists exactly those; a failed ``write`` leaves every committed
step untouched.
"""

from __future__ import annotations

from typing import Any, Protocol

from lowcomm.checkpoint.staging import Snapshot

__all__ = ["StorageLevel"]


class StorageLevel(Protocol):
    """One checkpoint level of one rank.

    Attributes:
        name: ``"host"``, ``"local"`` or ``"remote"``: the name ``SaveHandle``, ``CheckpointInfo``
            and ``CheckpointWriteError.level`` use.
        url: where it stores (``"host://"``, a directory, an fsspec URL), for messages.
        holds_host_buffer: whether ``write`` reads the snapshot's host buffer (the copier takes one
            hold on the buffer for each such level; the level's writer releases it).
    """

    name: str
    url: str
    holds_host_buffer: bool

    def write(self, snap: Snapshot) -> None:
        """Commit this rank's part of ``snap`` at this level; blocks until it is committed.

        Called by the pipeline's thread for this level, one snapshot at a time. Raises
        ``CheckpointWriteError`` (the cause inside says why); committed steps are untouched.
        """
        ...

    def steps(self) -> list[int]:
        """Committed steps, oldest first. Cheap: no verification."""
        ...

    def partial_steps(self) -> list[int]:
        """Steps started but not committed (in flight, or left by a crashed writer), which
        retention may remove once a newer step committed."""
        ...

    def load(self, step: int, *, into: Any = None) -> tuple[Any, dict[str, Any]]:
        """Read, verify and decode this rank's part of ``step``: returns (state, metadata).

        With ``into`` (a state of the same structure) tensors are restored into it in place and it
        is returned. Raises ``CheckpointCorruptError`` when verification fails (and ``OSError`` or
        the remote's own errors when storage cannot be read).
        """
        ...

    def delete(self, step: int) -> None:
        """Remove ``step``: its marker first (so it stops existing at once), then its data."""
        ...
