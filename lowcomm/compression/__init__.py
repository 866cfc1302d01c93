"""Codecs for tensors on the wire and on disk: quantizers, top-k, error feedback, zstd."""

from __future__ import annotations

__all__: list[str] = []
