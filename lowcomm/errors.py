"""The root of lowcomm's exception hierarchy: catch ``LowcommError`` to catch every runtime failure.

Bad input raises ``ValueError`` (or ``TypeError``) at the edge; ``LowcommError`` and its subclasses
mean something failed at run time (a peer died, a checkpoint is corrupt) and say what to do about it.
Subpackages define their own subclasses next to the code that raises them.
"""

from __future__ import annotations

__all__ = ["LowcommError"]


class LowcommError(RuntimeError):
    """A runtime failure inside lowcomm. The message says what happened and what to do."""
