"""Helpers for the control-plane tests: a master in-process, peers as threads or processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

from lowcomm.comm import CommConfig, Communicator, Master
from tests._tokens import TOKEN

# Short timeouts so that faults resolve in seconds; generous enough for a loaded 2-core box.
FAST = CommConfig(timeout_s=30.0, poll_s=0.2, num_connections=2)


def start_master(heartbeat_timeout_s: float = 3.0, **kw: Any) -> Master:
    # A short first-peer grace: these masters are fresh, nobody re-registers with them.
    kw.setdefault("first_peer_grace_s", 0.1)
    return Master(
        ("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=heartbeat_timeout_s, **kw
    ).start()


def addr(master: Master) -> str:
    host, port = master.address
    return f"{host}:{port}"


def communicator(
    master_address: str, *, peer_group: int = 0, config: CommConfig = FAST
) -> Communicator:
    return Communicator(master_address, peer_group=peer_group, token=TOKEN, config=config)


def run_threads(fns: list[Callable[[], Any]], timeout_s: float = 60.0) -> list[Any]:
    """Runs each fn on its own thread; returns results (an exception object where one raised)."""
    results: list[Any] = [None] * len(fns)

    def wrap(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a peer thread hung past the test's bound"
    return results


def connect_all(
    master_address: str, n: int, *, groups: list[int] | None = None
) -> list[Communicator]:
    """n communicators accepted into one world (the first admits the rest)."""
    comms = [communicator(master_address, peer_group=(groups or [0] * n)[i]) for i in range(n)]
    comms[0].connect(timeout_s=30)

    def join(c: Communicator) -> None:
        c.connect(timeout_s=30)
        # Every accepted peer takes part in every update_topology() (the PCCL model).
        while c.world_size < n:
            c.update_topology(timeout_s=30)

    results = run_threads([lambda c=c: join(c) for c in comms[1:]] + [lambda: _admit(comms[0], n)])
    assert all(r is None for r in results), results
    return comms


def _admit(comm: Communicator, n: int) -> None:
    while comm.world_size < n:
        comm.update_topology(timeout_s=30)


_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "lowcomm.comm"])


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:
        conn.send(("err", type(e).__name__, str(e), traceback.format_exc()))
    finally:
        conn.close()
        os._exit(0)


class Peer:
    """A peer process running ``fn(*args)``; ``result()`` returns its value or raises."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._recv, send = _CTX.Pipe(duplex=False)
        self.process = _CTX.Process(target=_child, args=(send, fn, args), daemon=True)
        self.process.start()
        send.close()

    def result(self, timeout_s: float = 60.0) -> Any:
        if not self._recv.poll(timeout_s):
            raise TimeoutError(f"peer process {self.process.pid} gave no result in {timeout_s} s")
        msg = self._recv.recv()
        self.process.join(10)
        if msg[0] == "err":
            raise RuntimeError(f"{msg[1]}: {msg[2]}\n{msg[3]}")
        return msg[1]

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
