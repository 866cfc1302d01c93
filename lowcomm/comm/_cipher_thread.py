"""A connection direction's helper thread that seals (or opens) a frame's records while the
connection's own thread is in the socket call for the neighbouring record.

Why: sealing and opening cost about as much CPU as the socket copies themselves (AES-GCM at
7-12 GB/s against a loopback copy at about 5 GB/s each side), and on one thread they add up: a
sender that seals then sends keeps the wire idle while it seals. AES-GCM (``cryptography``) and the
socket calls both release the GIL, so with a core to spare the helper seals record k+1 while the
sender writes record k (or opens record k while the receiver reads record k+1), and a protected
frame costs the wall clock of the slower of the two, not their sum. A connection queues several
records of a frame at once (``_aead.RECORD_SLOTS``), so the thread runs them back to back instead
of sleeping and waking (and trading the GIL) once per record. Frames of one record (every
control frame) never use it.

Contract: ``run(job)`` queues ``job`` (a callable taking no arguments) on the thread and returns a
``Pending``; ``Pending.wait()`` blocks until it has run and re-raises what it raised. Jobs run one
at a time in the order they were queued, so a ``FrameCipher`` whose records are sealed only here
keeps its nonces in order. One ``CipherThread`` per direction of a connection; the connection
serialises its senders (and its receivers), so one thread at a time queues and waits. The thread
starts on the first job and ends at ``close()`` (it is a daemon: a process may exit without it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

__all__ = ["CipherThread", "Pending"]


class Pending:
    """One queued job: ``wait()`` returns once it has run, re-raising its exception."""

    __slots__ = ("_done", "_error", "_finished", "_job")

    def __init__(self, job: Callable[[], None]) -> None:
        self._job = job
        # A SimpleQueue (C, one lock) is a cheaper one-shot signal than an Event (a Condition).
        self._done: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._finished = False
        self._error: BaseException | None = None

    def execute(self) -> None:
        try:
            self._job()
        except BaseException as exc:  # handed to the waiter; the thread lives on
            self._error = exc
        finally:
            self._done.put(True)

    def wait(self) -> None:
        """Blocks until the job has run (jobs are short: one record's AES-GCM); re-raises its
        exception (again on every later call)."""
        if not self._finished:
            self._done.get()
            self._finished = True
        if self._error is not None:
            raise self._error


class CipherThread:
    """Runs the sealing (or opening) jobs of one direction of one connection, in order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def run(self, job: Callable[[], None]) -> Pending:
        """Queues ``job``; returns its ``Pending``. After ``close()`` the job runs on the
        calling thread (so a waiter never hangs on a thread that is gone), once the thread has
        run the jobs queued before it: two threads never use the cipher at once, out of order."""
        pending = Pending(job)
        with self._lock:
            closed, thread = self._closed, self._thread
            if not closed:
                if thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                    self._thread.start()
                self._jobs.put(pending)
        if closed:
            if thread is not None and thread is not threading.current_thread():
                thread.join()  # the queued jobs are one record's AES-GCM each: short
            pending.execute()
        return pending

    def _loop(self) -> None:
        while True:
            pending = self._jobs.get()
            if pending is None:
                return
            pending.execute()

    def close(self) -> None:
        """Ends the thread once the queued jobs have run. Idempotent; does not wait."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._jobs.put(None)
