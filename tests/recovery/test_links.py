"""A stage's links (``lowcomm.recovery._links``): a message ahead of the awaited key is kept.

With run-ahead, a stage can still be receiving in the attempt after step t when a neighbour, which
already read t's bad verdict, sends its retry of t. That message is ahead of the key the stage
waits for; it must be kept for the retry's receive (and the receive must give up with the abort
the same verdict brings), not dropped as a protocol error, which would make the retry wait out
its timeout and fail again.
"""

from __future__ import annotations

import threading
from collections import deque

import pytest
import torch

from lowcomm.comm import CommTimeoutError, ProtocolError
from lowcomm.recovery._links import FWD, Links
from lowcomm.recovery.errors import StepAbortedError


class _Wire:
    """What ``Links`` asks of a communicator's receive: the queued messages, in order."""

    def __init__(self, *messages: tuple[tuple[int, int, int], torch.Tensor]) -> None:
        self.queue = deque(
            torch.cat([torch.tensor(k, dtype=torch.float32), d]) for k, d in messages
        )
        self.reads = 0

    def recv(self, out: torch.Tensor, *, from_: str, tag: int, timeout_s: float) -> None:
        if not self.queue:
            threading.Event().wait(timeout_s)
            raise CommTimeoutError("nothing arrived")
        out.copy_(self.queue.popleft())
        self.reads += 1


def _links(wire: _Wire, abort: threading.Event, timeout_s: float = 30.0) -> Links:
    return Links(wire, abort=abort, reason=lambda: "voted down", timeout_s=timeout_s)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_a_message_ahead_is_kept_for_the_retry_and_the_receive_gives_up_with_the_abort() -> None:
    retry = torch.arange(4, dtype=torch.float32)
    wire = _Wire(((9, 3, 0), retry))  # the neighbour's retry of step 3, epoch 9
    abort = threading.Event()
    links = _links(wire, abort)
    timer = threading.Timer(0.2, abort.set)  # the bad verdict of step 3 reaches this stage
    timer.start()
    with pytest.raises(StepAbortedError, match="voted down"):
        links.recv((4,), from_="a", tag=FWD, key=(8, 4, 0))  # still in the attempt ahead
    timer.join()
    abort.clear()
    got = links.recv((4,), from_="a", tag=FWD, key=(9, 3, 0))  # the retry
    assert torch.equal(got, retry) and wire.reads == 1  # the kept message, nothing read again


@pytest.mark.timeout(30)
def test_a_message_ahead_without_an_abort_is_a_protocol_error_and_stale_ones_are_dropped() -> None:
    wire = _Wire(((1, 0, 0), torch.zeros(2)), ((5, 0, 0), torch.ones(2)))
    links = _links(wire, threading.Event(), timeout_s=0.3)
    with pytest.raises(ProtocolError, match="ahead of"):
        links.recv((2,), from_="a", tag=FWD, key=(2, 0, 0))
    assert links.stale_dropped == 1
    # The message ahead is still kept: the receive of its own key gets it.
    assert torch.equal(links.recv((2,), from_="a", tag=FWD, key=(5, 0, 0)), torch.ones(2))
