"""A direct ``Ring.all_reduce`` on the main thread, interrupted (Ctrl-C: SIGINT) while it waits for
its ring threads: it raises KeyboardInterrupt only once every ring thread has ended, so nothing
writes into the caller's buffers afterwards, and the ring is aborted, so the neighbour fails.

Before, the interrupt propagated out of ``Thread.join`` at once, with the op still running (it
completed behind the caller's back), and on CPython 3.11/3.12 an interrupted join also marks the
thread stopped while it runs, so ``is_alive`` could not be trusted to wait for it either.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import pytest
import torch

from lowcomm.comm import PeerListener, Ring, connect_ring
from lowcomm.comm._ring_threads import OpThreads
from lowcomm.comm.errors import CommError
from lowcomm.faults import FaultInjector
from tests._tokens import TOKEN

pytestmark = pytest.mark.timeout(60)

OP_TIMEOUT_S = 30.0
NUMEL = 400_000  # 1.6 MB: threaded, 7 sub-chunks per chunk at 64 KiB


def _ring_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("lowcomm-ring-")}


def _main_waits_for_its_ring_threads() -> bool:
    """Whether the main thread is blocked in ``threading`` (a join or an event wait) under
    ``RingPipeline.run``, not starting a thread or producing the first step."""
    frame: FrameType | None = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None or not frame.f_code.co_filename.endswith("threading.py"):
        return False
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("start", "set", "produce_first_step"):
            return False
        if code.co_name == "run" and code.co_filename.endswith("_ring_pipeline.py"):
            return True
        frame = frame.f_back
    return False


def _rings(faults1: FaultInjector) -> tuple[list[Ring], list[PeerListener]]:
    listeners = [PeerListener("127.0.0.1", 0, token=TOKEN) for _ in range(2)]
    addresses = [lst.address for lst in listeners]
    rings: list[Any] = [None, None]

    def make(rank: int) -> None:
        rings[rank] = connect_ring(
            listener=listeners[rank],
            rank=rank,
            addresses=addresses,
            ring_id="interrupt",
            token=TOKEN,
            num_connections=2,
            subchunk_bytes=1 << 16,
            faults=faults1 if rank == 1 else None,
            timeout_s=20,
        )

    other = threading.Thread(target=make, args=(1,), daemon=True)
    other.start()
    make(0)
    other.join(30)
    assert all(isinstance(r, Ring) for r in rings), rings
    return rings, listeners


def test_an_interrupted_all_reduce_raises_only_after_its_ring_threads_end() -> None:
    assert threading.current_thread() is threading.main_thread()
    faults1, release, delivered = FaultInjector(), threading.Event(), threading.Event()

    def interrupt_then_hold(context: Any) -> None:
        # Peer 1's first all-gather send: peer 0's ring threads still have sub-chunks to
        # receive and write into `out`. Interrupt peer 0's caller once it waits for them.
        while not _main_waits_for_its_ring_threads():
            time.sleep(0.002)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        delivered.set()
        release.wait(OP_TIMEOUT_S)

    faults1.inject("ring.send", call=interrupt_then_hold, where={"step": 1}, times=1)
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    rings, listeners = _rings(faults1)
    before = _ring_threads()
    try:
        inputs = [torch.randn(NUMEL, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
        out = torch.full((NUMEL,), float("nan"))
        peer1: dict[str, Any] = {}

        def run_peer1() -> None:
            try:
                peer1["result"] = rings[1].all_reduce(inputs[1], "sum", timeout_s=OP_TIMEOUT_S)
            except BaseException as exc:
                peer1["result"] = exc

        other = threading.Thread(target=run_peer1, daemon=True)
        other.start()
        raised: BaseException | None = None
        try:
            rings[0].all_reduce(inputs[0], "sum", out=out, timeout_s=OP_TIMEOUT_S)
        except BaseException as exc:
            raised = exc
        at_raise = out.clone()
        release.set()
        other.join(OP_TIMEOUT_S)
        # Let every ring thread of both peers end (bounded by the test's timeout), then look.
        while _ring_threads() - before:
            time.sleep(0.01)
    finally:
        release.set()
        signal.signal(signal.SIGINT, old_handler)
        for ring in rings:
            ring.close()
        for lst in listeners:
            lst.close()
    assert faults1.fired("ring.send") == 1 and delivered.is_set(), "the fault did not fire"
    assert isinstance(raised, KeyboardInterrupt), raised
    # Nothing was written into the caller's tensor after the op raised.
    assert torch.equal(at_raise.view(torch.int32), out.view(torch.int32)), "written after raise"
    # The interrupted op was aborted, not left to finish: the neighbour failed too.
    assert rings[0].closed
    assert isinstance(peer1.get("result"), CommError), peer1.get("result")


def test_op_threads_wait_survives_an_interrupt_and_waits_for_the_real_end() -> None:
    threads, hold, finished = OpThreads(), threading.Event(), threading.Event()

    def held() -> None:
        hold.wait(OP_TIMEOUT_S)
        finished.set()

    def main_in_wait() -> bool:
        frame = sys._current_frames().get(threading.main_thread().ident or 0)
        while frame is not None:
            if frame.f_code.co_filename.endswith("_ring_threads.py"):
                return frame.f_code.co_name == "wait"
            frame = frame.f_back
        return False

    def interrupt() -> None:
        while not main_in_wait():
            time.sleep(0.002)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threads.start(held, "lowcomm-test-held")
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            threads.wait(time.monotonic() + OP_TIMEOUT_S)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    # Still known to run (an interrupted Thread.join would now say it had stopped) ...
    assert threads.running() == ["lowcomm-test-held"] and not finished.is_set()
    hold.set()
    # ... and waited for again, to its real end.
    assert threads.wait(time.monotonic() + OP_TIMEOUT_S)
    assert finished.is_set() and threads.running() == []
