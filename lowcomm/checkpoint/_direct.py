"""Direct writes: the local level writes CPU tensors to disk straight from the live tensors.

Parameters and optimizer moments do not change between ``save`` and the next
``wait_until_safe_to_mutate`` (the optimizer step), so on CPU the local writer can ``pwrite`` each
chunk of the layout from the tensors' own memory while forward and backward run: one pass over the
bytes (the write into the page cache) plus the checksum, instead of a staging copy, then the write.
At ``wait_until_safe_to_mutate`` (``freeze``), the chunks no writer has started yet are copied into
a reused host buffer (the writers then write them from there), and the chunks being written from
the live tensors are waited for, so the file holds the state as of ``save`` and the caller may
mutate the tensors once ``freeze`` returns.

Chunk states: ``PENDING`` -> ``LIVE`` (a writer reads the live tensors) -> ``DONE``; or, at a
freeze, ``PENDING`` -> ``STAGED`` (its bytes are in the host buffer; written from there).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

from lowcomm._tensors import byte_array
from lowcomm.checkpoint._format import TensorEntry
from lowcomm.checkpoint._state import TensorRef
from lowcomm.checkpoint.errors import CheckpointTimeoutError

__all__ = ["DirectWrite", "can_write_direct"]

_PENDING, _LIVE, _STAGING, _STAGED, _DONE = range(5)
_ZEROS = memoryview(
    bytearray(64)
)  # never written: read as padding  # the alignment gaps between tensors (< 64 bytes each)


def can_write_direct(refs: list[TensorRef]) -> bool:
    """True when every tensor is a contiguous CPU tensor (its bytes can be written as they are)."""
    return all(r.tensor.device.type == "cpu" and r.tensor.is_contiguous() for r in refs)


class DirectWrite:
    """The chunks of one snapshot written from live CPU tensors. Thread-safe.

    The local level's chunk writers call ``begin``/``end`` around each chunk; the training thread
    calls ``freeze`` (through ``Checkpointer.wait_until_safe_to_mutate``); the pipeline calls
    ``abandon`` when the write failed or ended. ``done`` is set once the live tensors are no longer
    read: after ``freeze``, after every chunk was written, or after ``abandon``.
    """

    def __init__(
        self,
        refs: list[TensorRef],
        entries: list[TensorEntry],
        *,
        total_bytes: int,
        chunk_bytes: int,
        done: threading.Event,
    ) -> None:
        self.total_bytes = total_bytes
        self.chunk_bytes = chunk_bytes
        self.done = done
        self.staged_bytes = 0  # bytes copied at the freeze (reported by the benchmark)
        self.buffer: torch.Tensor | None = None  # the host buffer's data, set by freeze if used
        self.buffer_handle: Any = None  # the pool's HostBuffer, released by the pipeline
        # (offset, bytes) of every tensor in the layout; gaps between are zeros.
        self._spans: list[tuple[int, np.ndarray[Any, Any]]] = [
            (e.offset, byte_array(r.tensor)) for r, e in zip(refs, entries, strict=True) if e.nbytes
        ]
        n = (total_bytes + chunk_bytes - 1) // chunk_bytes
        self._state = [_PENDING] * n
        self._frozen = False
        self._cond = threading.Condition()

    def num_chunks(self) -> int:
        return len(self._state)

    def _pieces(self, lo: int, hi: int) -> list[memoryview]:
        """The bytes [lo, hi) of the layout as views of the live tensors and zero padding."""
        out: list[memoryview] = []
        pos = lo
        for off, arr in self._spans:
            end = off + arr.size
            if end <= pos:
                continue
            if off >= hi:
                break
            if off > pos:
                out.append(_ZEROS[: off - pos])
                pos = off
            take = min(end, hi)
            out.append(memoryview(arr[pos - off : take - off]))  # type: ignore[arg-type]
            pos = take
        while pos < hi:
            n = min(hi - pos, len(_ZEROS))
            out.append(_ZEROS[:n])
            pos += n
        return out

    def begin(self, index: int, *, timeout_s: float) -> list[memoryview]:
        """The bytes of chunk ``index`` to write (and checksum); call ``end(index)`` after."""
        lo = index * self.chunk_bytes
        hi = min(lo + self.chunk_bytes, self.total_bytes)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._state[index] == _STAGING:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckpointTimeoutError(f"chunk {index} was not staged in time")
                self._cond.wait(left)
            if self._state[index] == _PENDING:
                self._state[index] = _LIVE
                return self._pieces(lo, hi)
            if self._state[index] == _STAGED:
                assert self.buffer is not None
                return [memoryview(self.buffer.numpy())[lo:hi]]  # type: ignore[arg-type]
            raise RuntimeError(
                f"chunk {index} was not staged (the freeze failed) or is written twice"
            )

    def end(self, index: int) -> None:
        """Chunk ``index`` is written (or failed): its live bytes are no longer read."""
        with self._cond:
            self._state[index] = _DONE
            self._cond.notify_all()
            if all(s == _DONE for s in self._state):
                self.done.set()

    def abandon(self) -> None:
        """The write ended (committed or failed): nothing is left to read from the live tensors."""
        with self._cond:
            self._frozen = True
            while _LIVE in self._state or _STAGING in self._state:
                self._cond.wait()
            self._state = [_DONE if s == _PENDING else s for s in self._state]
            self._spans = []  # drop the references to the training tensors
        self.done.set()

    def freeze(self, acquire: Any, *, timeout_s: float) -> None:
        """Make the live tensors free to change: copy the chunks not yet started into a host buffer
        (``acquire(nbytes)`` returns a pool ``HostBuffer``) and wait for the ones being written.

        Training thread. Raises ``CheckpointTimeoutError`` if a live write does not end in time.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._frozen:
                todo: list[int] = []
            else:
                self._frozen = True
                todo = [i for i, s in enumerate(self._state) if s == _PENDING]
                for i in todo:
                    self._state[i] = _STAGING
        if todo:
            try:
                handle = acquire(self.total_bytes)
                buf = handle.data
                dest = buf.numpy()
                for i in todo:
                    lo = i * self.chunk_bytes
                    hi = min(lo + self.chunk_bytes, self.total_bytes)
                    pos = lo
                    for piece in self._pieces(lo, hi):
                        # numpy: 12x faster here than torch's copy_ from a frombuffer view
                        n = len(piece)
                        np.copyto(dest[pos : pos + n], np.frombuffer(piece, dtype=np.uint8))
                        pos += n
                    self.staged_bytes += hi - lo
            except BaseException:
                with self._cond:  # the writers fail these chunks instead of waiting forever
                    for i in todo:
                        self._state[i] = _DONE
                    self._cond.notify_all()
                raise
            with self._cond:
                self.buffer, self.buffer_handle = buf, handle
                for i in todo:
                    self._state[i] = _STAGED
                self._cond.notify_all()
        with self._cond:
            while _LIVE in self._state:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckpointTimeoutError("a checkpoint write from the live tensors hung")
                self._cond.wait(left)
        self.done.set()
