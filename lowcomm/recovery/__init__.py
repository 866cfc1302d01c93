"""Stage recovery (CheckFree) and bringing new or restarted peers to the current state."""

from __future__ import annotations

__all__: list[str] = []
