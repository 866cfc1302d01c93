"""The ``lowcomm`` command (master, join, run, demo), config loading and logging setup.

Only this package reads TOML files and ``LOWCOMM_*`` environment variables, and only it installs
logging handlers; the library modules just log.
"""

from __future__ import annotations

from lowcomm.launch.logs import setup_logging

__all__ = ["setup_logging"]
