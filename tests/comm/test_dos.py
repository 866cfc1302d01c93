"""Denial of service before authentication: a thousand idle and trickling connections, which never
prove the token, must not stop a ring build, a shared-state sync or a master registration.

Every flood is bounded (a fixed number of sockets, a fixed duration), stays on loopback (sources
127.0.0.2-127.0.0.11 play strangers on other hosts, 127.0.0.1 a stranger on a peer's own host) and
is closed at the end of its test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lowcomm.comm import PeerListener, connect_ring
from lowcomm.comm._handshake_slots import HandshakeSlots
from lowcomm.comm.shared_state import SharedState
from tests._tokens import TOKEN
from tests.comm._control_harness import addr, communicator, connect_all, run_threads, start_master

pytestmark = pytest.mark.timeout(90)

_STRANGER_HOSTS = [f"127.0.0.{i}" for i in range(2, 12)]


class Flood:
    """``num`` connections to ``target``: spread over the stranger hosts and 127.0.0.1; every
    other one trickles a byte every 0.3 s (a slowloris), the rest stay silent. Connections the
    server closes are reopened (bounded: at most ``num`` open at once, until ``close``)."""

    def __init__(self, target: tuple[str, int], num: int = 1000) -> None:
        self.target = target
        self.num = num
        self.socks: list[tuple[socket.socket, str, bool]] = []
        self.opened = 0
        self._stop = threading.Event()
        for i in range(num):
            self._open(i)
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _open(self, i: int) -> None:
        hosts = [*_STRANGER_HOSTS, "127.0.0.1"]
        host = hosts[i % len(hosts)]
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((host, 0))
        s.connect_ex(self.target)  # non-blocking: a full backlog only delays the attacker
        self.socks.append((s, host, i % 2 == 0))
        self.opened += 1

    def _trickle(self) -> None:
        while not self._stop.wait(0.3):
            alive = []
            for s, host, slow in self.socks:
                try:
                    if slow:
                        s.send(b"L")
                    alive.append((s, host, slow))
                except (BlockingIOError, InterruptedError):
                    alive.append((s, host, slow))
                except OSError:
                    s.close()
            self.socks = alive
            for i in range(self.num - len(self.socks)):  # keep the pressure on
                with contextlib.suppress(OSError):
                    self._open(i)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s, _, _ in self.socks:
            s.close()


@contextlib.contextmanager
def flooded(*targets: tuple[str, int], num: int = 1000) -> Iterator[list[Flood]]:
    floods = [Flood(t, num // len(targets)) for t in targets]
    try:
        time.sleep(0.5)  # let the flood occupy every slot it can
        yield floods
    finally:
        for f in floods:
            f.close()


def test_a_ring_builds_in_seconds_while_a_thousand_idle_and_slow_connections_hit_both_peers() -> (
    None
):
    listeners = [PeerListener("127.0.0.1", 0, token=TOKEN) for _ in range(2)]
    addresses = [lst.address for lst in listeners]
    try:
        with flooded(*addresses, num=1000) as floods:
            start = time.monotonic()
            rings = run_threads(
                [
                    lambda r=r: connect_ring(
                        listener=listeners[r],
                        rank=r,
                        addresses=addresses,
                        ring_id="flooded",
                        token=TOKEN,
                        num_connections=4,
                        timeout_s=20,
                    )
                    for r in range(2)
                ],
                timeout_s=30,
            )
            built_s = time.monotonic() - start
            assert not any(isinstance(r, BaseException) for r in rings), rings
            tensors = [torch.full((1000,), float(r + 1)) for r in range(2)]
            run_threads([lambda r=r: rings[r].all_reduce(tensors[r], "sum") for r in range(2)])
            assert all(torch.equal(t, torch.full((1000,), 3.0)) for t in tensors)
            for ring in rings:
                ring.close()
            # the flood really was there, and was refused, not served
            assert all(f.opened >= 500 for f in floods)
            rejected = [lst.num_rejected + lst.num_evicted for lst in listeners]
            assert all(n > 50 for n in rejected), rejected
        assert built_s < 5.0, f"the ring took {built_s:.1f} s to build under the flood"
    finally:
        for lst in listeners:
            lst.close()


def test_master_registration_and_a_shared_state_sync_succeed_while_flooded() -> None:
    master = start_master(heartbeat_timeout_s=5.0)
    try:
        comms = connect_all(addr(master), 2)
        joiner = communicator(addr(master))
        peers = [c._advertised() for c in comms]
        with flooded(master.address, *peers, num=1200):
            start = time.monotonic()
            states = [
                SharedState({"w": torch.full((50_000,), 7.0)}, revision=4),
                SharedState({"w": torch.full((50_000,), 7.0)}, revision=4),
                SharedState({"w": torch.zeros(50_000)}, revision=0),
            ]

            def running(i: int) -> Any:
                comms[i].update_topology(timeout_s=20)
                return comms[i].sync_shared_state(states[i], timeout_s=20)

            def joining() -> Any:
                joiner.connect(timeout_s=20)  # registration at the flooded master
                return joiner.sync_shared_state(states[2], timeout_s=20)

            def go() -> list[Any]:
                time.sleep(0.3)
                return run_threads([lambda: running(0), lambda: running(1)])

            res = run_threads([go, joining], timeout_s=60)
            took_s = time.monotonic() - start
            assert not isinstance(res[1], BaseException), res
            assert all(not isinstance(r, BaseException) for r in res[0]), res
            assert torch.equal(states[2].tensors["w"], states[0].tensors["w"])
            assert master.snapshot()["num_rejected_connections"] > 50
        assert took_s < 8.0, f"registration and sync took {took_s:.1f} s under the flood"
        for c in [*comms, joiner]:
            c.close()
    finally:
        master.stop()


def test_a_stranger_holds_at_most_its_share_and_an_expected_host_takes_a_strangers_slot() -> None:
    slots = HandshakeSlots(name="test", max_total=4, max_per_source=2, stale_s=60)
    socks = [socket.socket() for _ in range(8)]
    try:
        assert slots.admit(socks[0], "10.0.0.9") and slots.admit(socks[1], "10.0.0.9")
        assert slots.admit(socks[2], "10.0.0.9") is None  # its per-source share is used up
        assert slots.admit(socks[3], "10.0.0.8") and slots.admit(socks[4], "10.0.0.8")
        assert slots.admit(socks[5], "10.0.0.7") is None  # full, and no stranger is stale
        with slots.expecting(["10.0.0.1"]):
            slot = slots.admit(socks[6], "10.0.0.1")
            assert slot is not None and slot.priority
        assert slots.num_evicted == 1 and slots.num_active == 4
        assert slots.num_rejected == 2
        slots.authenticated("10.0.0.5")  # proved the token once: priority from now on
        assert slots.admit(socks[7], "10.0.0.5") is not None and slots.num_evicted == 2
    finally:
        for s in socks:
            s.close()
