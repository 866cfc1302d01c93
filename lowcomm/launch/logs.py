"""Logging setup for the ``lowcomm`` command and for scripts that want lowcomm's log format."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s%(peer)s: %(message)s"


class _PeerTag(logging.Filter):
    """Adds ``[peer]`` to each record so interleaved logs of local peers can be told apart."""

    def __init__(self, peer: str | None) -> None:
        super().__init__()
        self._tag = f" [{peer}]" if peer else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.peer = self._tag
        return True


def setup_logging(level: str | int | None = None, *, peer: str | None = None) -> None:
    """Installs one stderr handler on the ``lowcomm`` logger. Idempotent; call once per process.

    Args:
        level: a logging level; default ``LOWCOMM_LOG_LEVEL`` or ``INFO``.
        peer: a short tag (for example ``"peer2"``) added to every line.
    """
    if level is None:
        level = os.environ.get("LOWCOMM_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = level.upper()
    logger = logging.getLogger("lowcomm")
    for handler in list(logger.handlers):
        if getattr(handler, "_lowcomm", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._lowcomm = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_PeerTag(peer))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
