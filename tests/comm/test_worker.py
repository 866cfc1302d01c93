"""The worker queue: tasks in submission order, blocking calls inline when nothing else runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from lowcomm.comm._worker import Handle, TaskQueue
from lowcomm.comm.errors import TopologyError


def _queue() -> TaskQueue:
    q = TaskQueue("test-worker", check=lambda: None)
    q.start()
    return q


def test_a_blocking_call_on_an_idle_queue_runs_on_the_calling_thread() -> None:
    q = _queue()
    try:
        ran_on = q.call(lambda _d: threading.current_thread(), time.monotonic() + 10, "op")
        assert ran_on is threading.current_thread()
    finally:
        q.close()


def test_a_blocking_call_waits_for_the_queued_tasks_and_runs_after_them() -> None:
    q = _queue()
    order: list[str] = []
    release = threading.Event()
    try:

        def first(_d: float) -> None:
            release.wait(10)
            order.append("first")

        handle = q.submit(first, time.monotonic() + 10, "first")
        submit = q.submit

        def submit_then_release(*args: Any) -> Handle:
            queued = submit(*args)  # "second" is queued behind "first": let "first" finish
            release.set()
            return queued

        q.submit = submit_then_release  # type: ignore[method-assign,assignment]

        def second(_d: float) -> threading.Thread:
            order.append("second")
            return threading.current_thread()

        ran_on = q.call(second, time.monotonic() + 10, "second")
        handle.wait(10)
        assert release.is_set() and order == ["first", "second"]
        assert ran_on is not threading.current_thread()  # it was queued behind "first"
    finally:
        q.close()


def test_a_task_submitted_during_an_inline_call_runs_after_it() -> None:
    q = _queue()
    order: list[str] = []
    inline_handles: list[Handle] = []
    try:

        def inline(_d: float) -> None:
            # Submitted while this call runs: the worker thread must not start it meanwhile.
            handle = q.submit(lambda _d: order.append("async"), time.monotonic() + 10, "async")
            assert not handle.done()
            order.append("inline")
            inline_handles.append(handle)

        q.call(inline, time.monotonic() + 10, "inline")
        inline_handles[0].wait(10)
        assert order == ["inline", "async"]
    finally:
        q.close()


def test_a_blocking_call_raises_its_error_and_the_queue_goes_on() -> None:
    q = _queue()
    try:

        def fail(_d: float) -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            q.call(fail, time.monotonic() + 10, "fail")
        assert q.submit(lambda _d: 7, time.monotonic() + 10, "after").wait(10) == 7
    finally:
        q.close()


def test_a_blocking_call_on_a_closed_queue_raises() -> None:
    q = _queue()
    q.close()
    with pytest.raises(TopologyError):
        q.call(lambda _d: None, time.monotonic() + 10, "late")
