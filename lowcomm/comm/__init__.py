"""The WAN collective layer: master, communicator, ring all-reduce, shared state."""

from __future__ import annotations

__all__: list[str] = []
