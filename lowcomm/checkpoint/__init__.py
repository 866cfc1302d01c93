"""Lazy asynchronous multi-level checkpointing: host memory, local disk, remote storage."""

from __future__ import annotations

__all__: list[str] = []
