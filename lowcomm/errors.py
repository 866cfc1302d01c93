"""The root of lowcomm's exception hierarchy: catch ``LowcommError`` to catch every runtime failure.

Bad input raises ``ValueError`` (or ``TypeError``) at the edge; ``LowcommError`` and its subclasses
mean something failed at run time (a peer died, a checkpoint is corrupt) and say what to do about it.
Subpackages define their own subclasses next to the code that raises them.

Two mix-ins make the standard library's categories hold too, so generic code that knows nothing of
lowcomm handles our errors as it would any other: every lowcomm timeout is a ``TimeoutError``
(``LowcommTimeoutError``) and every lost connection to a peer or the master is a
``ConnectionError`` (``LowcommConnectionError``). Both are ``LowcommError`` first, so a trainer
needs one ``except LowcommError`` for everything the network or the disk can do to it.
"""

from __future__ import annotations

__all__ = ["LowcommConnectionError", "LowcommError", "LowcommTimeoutError"]


class LowcommError(RuntimeError):
    """A runtime failure inside lowcomm. The message says what happened and what to do."""


class LowcommTimeoutError(LowcommError, TimeoutError):
    """A blocking lowcomm call ran past its ``timeout_s``. Also a builtin ``TimeoutError``."""


class LowcommConnectionError(LowcommError, ConnectionError):
    """A connection to a peer or the master was lost or refused. Also a builtin
    ``ConnectionError``."""
