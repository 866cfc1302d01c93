"""Logging setup for the ``lowcomm`` command and for scripts that want lowcomm's log format."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s%(peer)s: %(message)s"


class _Format(logging.Formatter):
    """lowcomm's line format; adds ``[peer]`` so interleaved logs of local peers can be told apart.

    A formatter, not a filter, because a handler that borrows it (tqdm's logging redirect, which
    keeps the formatter and drops the filters) must format the same lines.
    """

    def __init__(self, peer: str | None) -> None:
        super().__init__(_FORMAT, datefmt="%H:%M:%S")
        self._tag = f" [{peer}]" if peer else ""

    def format(self, record: logging.LogRecord) -> str:
        record.peer = self._tag
        return super().format(record)


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
    handler.setFormatter(_Format(peer))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
