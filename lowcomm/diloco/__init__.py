"""Outer loops: DiLoCo, async DiLoCo, Streaming DiLoCo, CO2, delayed Nesterov."""

from __future__ import annotations

__all__: list[str] = []
