"""The buffers of a ring all-reduce: those a ring reuses between operations (``RingBuffers``) and
the record of what an operation overwrote, to put back after a failure (``Undo``).

``Ring.all_reduce`` owns one ``RingBuffers``; ``_ring_pipeline.RingPipeline`` fills and saves them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lowcomm.comm._ring_wire import Layout
from lowcomm.compression import Codec

__all__ = ["RingBuffers", "Undo"]


class Undo:
    """What an all-reduce overwrote, to put back after a failure (``Ring.all_reduce(undo=)``):
    the ring saves each sub-chunk into ``buffer`` (same offsets) just before it first writes it
    and records it in ``saved``. ``restore`` (once the op has returned) copies back exactly the
    saved regions: the rest was never written, and ``buffer`` there holds an earlier op's values."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.saved: list[tuple[int, int]] = []

    def save_all(self, dest: torch.Tensor) -> None:
        """Saves all of ``dest`` at once (the ops that cannot save region by region)."""
        with torch.no_grad():
            self.buffer.copy_(dest.reshape(-1))
        self.saved.append((0, dest.numel()))

    def restore(self, dest: torch.Tensor) -> None:
        """Puts the saved regions back into ``dest`` (flat, the tensor the op wrote)."""
        d, b = dest.detach().reshape(-1), self.buffer
        for lo, hi in self.saved:
            d[lo:hi].copy_(b[lo:hi])
        self.saved = []


class RingBuffers:
    """The buffers a ring reuses between operations: the fp32 working buffer, the staging buffer
    of a half-precision result, the receive arena of quantized sub-chunks, and the quantized
    sub-chunk layouts. One operation uses them at a time (the ring's lock)."""

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None
        self._stage: torch.Tensor | None = None
        self._arena: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self._layouts: dict[tuple[Any, int, bool], Layout] = {}

    def scratch(self, numel: int) -> torch.Tensor:
        """An fp32 buffer of ``numel`` values."""
        # Kept between calls: a fresh 100 MB buffer costs page faults on first touch.
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=torch.float32)
        return self._scratch[:numel]

    def stage(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of ``numel`` values of ``dtype`` (where a half-precision all-gather lands)."""
        if self._stage is None or self._stage.numel() < numel or self._stage.dtype != dtype:
            self._stage = torch.empty(numel, dtype=dtype)
        return self._stage[:numel]

    def arena(self, nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """A byte buffer of ``nbytes`` (every received quantized sub-chunk's slot)."""
        if self._arena is None or self._arena.nbytes < nbytes:
            self._arena = np.empty(max(nbytes, 1), dtype=np.uint8)
        return self._arena[:nbytes]

    def layout(self, codec: Codec, numel: int, *, checksum: bool) -> Layout:
        """The wire layout of a quantized sub-chunk of ``numel`` values (see ``Layout``)."""
        # Keyed by the codec's value (codecs are frozen dataclasses) or, failing that, identity.
        try:
            key: tuple[Any, int, bool] = (codec, numel, checksum)
            hash(key)
        except TypeError:
            key = (id(codec), numel, checksum)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 256:
                self._layouts.clear()
            layout = self._layouts[key] = Layout(codec, numel, checksum=checksum)
        return layout

    def drop(self) -> None:
        """Forgets the scratch, stage and arena buffers: a ring thread that outlived its operation
        may still write into them."""
        self._scratch = self._stage = self._arena = None
