"""A stage's messages to the other stages over a communicator's ``send``/``recv``, all abortable.

Activations and gradients travel as one float32 tensor: a three-number header ``(epoch, step,
micro_batch)`` and then the data. ``epoch`` counts the pipeline's votes, which every stage takes
in the same order (a replacement is told the count when it joins), so a message of an aborted
attempt never matches what the retry waits for: the receiver drops it and reads on (that also
completes the sender's abandoned send). Objects (state dicts, recovery headers, the (de)embedding
copies) travel as a length and the bytes of ``torch.save``, read back with ``weights_only=True``,
on a tag of their membership revision (``ctrl_tag``): two messages of different sizes cannot be
told apart by a header, so an object abandoned mid-way (the revision moved) is left on a tag
nobody reads again, and its sender's send times out.

Every receive waits in slices of ``SLICE_S`` and checks the stage's abort event between them (the
watcher sets it when the master's membership revision moves), so a stage waiting on a peer that
died or stopped gives up within a slice of the master noticing, never at the receive's timeout.
A timed-out slice reads nothing, so the kept connection stays good for the next one.

A message *ahead* of the awaited key is a neighbour's retry that outran this stage: it read a
step's bad verdict while this stage, having run ahead on a tentative step (``commit``), still
waits in the attempt after it. The message is kept (one per sender and tag) for the retry's
receive, and the receive waits for the abort that the same verdict brings; a second message
ahead, or no abort within the message bound, is a protocol error.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from typing import Any

import torch

from lowcomm.comm import CommTimeoutError, Communicator, Handle, ProtocolError
from lowcomm.recovery.errors import StepAbortedError

__all__ = ["BWD", "CTRL", "FWD", "SLICE_S", "Links", "ctrl_tag"]

logger = logging.getLogger(__name__)

# p2p tags: activations forward, gradients backward, objects (state, recovery headers, backups).
FWD, BWD, CTRL = 11, 12, 13
SLICE_S = 0.25
_HEADER = 3


def ctrl_tag(revision: int) -> int:
    """The tag of the objects sent while the membership is at ``revision``."""
    return CTRL + 16 * (1 + revision)


class Links:
    """One stage's sends and receives; see the module docstring. ``abort`` is the stage's abort
    event; ``reason()`` names why it is set (for the error). ``timeout_s`` bounds each message."""

    def __init__(
        self,
        comm: Communicator,
        *,
        abort: threading.Event,
        reason: Any,
        timeout_s: float,
    ) -> None:
        self.comm = comm
        self.abort = abort
        self._reason = reason
        self.timeout_s = timeout_s
        self.stale_dropped = 0
        self._ahead: dict[tuple[str, int], torch.Tensor] = {}  # (sender, tag): a message kept

    def check(self) -> None:
        """Raises ``StepAbortedError`` if the step was aborted."""
        if self.abort.is_set():
            raise StepAbortedError(str(self._reason()))

    # ------------------------------------------------------------------ tensors
    def send(self, data: torch.Tensor, *, to: str, tag: int, key: tuple[int, int, int]) -> Handle:
        """Starts sending ``data`` framed with ``key``; the caller waits on the handle (``wait``)."""
        msg = torch.empty(_HEADER + data.numel(), dtype=torch.float32)
        msg[:_HEADER] = torch.tensor(key, dtype=torch.float32)
        msg[_HEADER:] = data.detach().reshape(-1)
        return self.comm.send_async(msg, to=to, tag=tag, timeout_s=self.timeout_s)

    def recv(
        self, shape: tuple[int, ...], *, from_: str, tag: int, key: tuple[int, int, int]
    ) -> torch.Tensor:
        """The next message of ``key`` from ``from_``; older ones (an aborted attempt) are dropped."""
        numel = 1
        for n in shape:
            numel *= n
        buf = torch.empty(_HEADER + numel, dtype=torch.float32)
        while True:
            kept = self._ahead.pop((from_, tag), None)
            if kept is not None and kept.numel() == buf.numel():
                buf.copy_(kept)
            else:
                self._recv_into(buf, from_=from_, tag=tag)
            got = tuple(int(v) for v in buf[:_HEADER].tolist())
            if got == key:
                return buf[_HEADER:].clone().view(shape)
            if got < key:
                self.stale_dropped += 1
                logger.debug("dropped a stale message %s from %s (waiting for %s)", got, from_, key)
                continue
            if (from_, tag) not in self._ahead:  # kept (again) for the retry's receive
                self._ahead[(from_, tag)] = kept if kept is not None else buf.clone()
                if self.abort.wait(self.timeout_s):  # the verdict that let the sender retry
                    self.check()
            raise ProtocolError(f"message {got} from peer {from_} is ahead of {key}")

    def wait(self, handle: Handle) -> None:
        """Waits for a send, in slices, giving up if the step is aborted."""
        while True:
            self.check()
            try:
                handle.wait(SLICE_S)
                return
            except CommTimeoutError:
                if handle.done():
                    raise

    # ------------------------------------------------------------------ objects
    def send_obj(self, obj: Any, *, to: str, tag: int) -> None:
        """Sends ``obj`` (tensors, numbers, containers) and waits until ``to`` received it."""
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        self.wait(self.comm.send_async(size, to=to, tag=tag, timeout_s=self.timeout_s))
        self.wait(self.comm.send_async(data, to=to, tag=tag, timeout_s=self.timeout_s))

    def recv_obj(self, *, from_: str, tag: int) -> tuple[Any, int]:
        """The next object from ``from_`` on ``tag`` and its size in bytes."""
        size = torch.empty(1, dtype=torch.int64)
        self._recv_into(size, from_=from_, tag=tag)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self._recv_into(data, from_=from_, tag=tag)
        obj = torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)
        return obj, int(size.item())

    def _recv_into(self, out: torch.Tensor, *, from_: str, tag: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.check()
            try:
                self.comm.recv(out, from_=from_, tag=tag, timeout_s=SLICE_S)
                return
            except CommTimeoutError:
                if time.monotonic() >= deadline:
                    raise
