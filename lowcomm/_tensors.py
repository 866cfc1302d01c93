"""Tensors as bytes: the one place that views a tensor's memory as a flat byte buffer.

The wire (ring, point-to-point, shared state) and the checkpoint files move tensors as raw bytes;
they all go through ``byte_view`` so that the no-copy rule and its preconditions live in one place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["byte_array", "byte_view"]


def byte_array(t: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The bytes of a contiguous CPU tensor as a flat, writable uint8 array (no copy; any dtype).

    Raises:
        ValueError: ``t`` is not a contiguous CPU tensor (copy it there first).
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(
            f"byte_view needs a contiguous CPU tensor, got a {'non-contiguous ' if not t.is_contiguous() else ''}"
            f"tensor on {t.device}: copy it with .to('cpu').contiguous() first"
        )
    arr: np.ndarray[Any, np.dtype[np.uint8]] = t.detach().reshape(-1).view(torch.uint8).numpy()
    return arr


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a flat, writable memoryview (no copy; any dtype)."""
    arr: Any = byte_array(t)  # numpy arrays are buffers; numpy's stubs do not say so
    return memoryview(arr)
