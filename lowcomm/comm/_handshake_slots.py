"""Admission of unauthenticated connections: caps per source and in total, expected peers first.

Anyone who can reach a listening port can open connections that never authenticate. A
``HandshakeSlots`` bounds how many such connections are in their handshake at once, per source host
(``max_per_source``) and in total (``max_total``), and decides who gets a slot when they are full:

* a connection from a *priority* source (a host its owner expects, e.g. the ring neighbours the
  master announced, or one that has authenticated before) takes the slot of the oldest handshake
  of a stranger, or else the oldest of its own host;
* a stranger takes the slot of the oldest stranger's handshake if that one has already run longer
  than ``stale_s`` (a legitimate handshake takes a few round trips), else it is refused.

So idle or trickling connections hold a slot for at most the handshake deadline, one host cannot
hold more than ``max_per_source``, and the peers a ring is waiting for are served before strangers
however many strangers there are. Refusals and failed handshakes are counted, and logged once per
source host (then at DEBUG), so a flood of connections cannot flood the log.

Thread-safe.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["HandshakeSlots", "Slot"]

logger = logging.getLogger(__name__)

_MAX_REMEMBERED_HOSTS = 4096


@dataclass(eq=False)
class Slot:
    """One admitted handshake; ``release`` it when the handshake ends."""

    host: str
    sock: socket.socket
    priority: bool
    started: float = field(default_factory=time.monotonic)
    evicted: bool = False


class HandshakeSlots:
    """Concurrent unauthenticated handshakes of one server socket (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str,
        max_total: int = 64,
        max_per_source: int = 8,
        stale_s: float = 0.5,
    ) -> None:
        if max_total < 1 or max_per_source < 1:
            raise ValueError(
                f"max_total and max_per_source must be >= 1, got {max_total}, {max_per_source}"
            )
        self.name = name
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._active: list[Slot] = []  # oldest first
        self._expected: collections.Counter[str] = collections.Counter()
        self._known: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._logged: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.num_rejected = 0
        self.num_evicted = 0

    # ----- what the owner tells it -------------------------------------------------------------
    @contextlib.contextmanager
    def expecting(self, hosts: Iterable[str]) -> Iterator[None]:
        """While the block runs, connections from ``hosts`` have priority."""
        hosts = list(hosts)
        with self._lock:
            self._expected.update(hosts)
        try:
            yield
        finally:
            with self._lock:
                self._expected.subtract(hosts)
                self._expected = +self._expected

    def authenticated(self, host: str) -> None:
        """Remembers ``host`` as one that has proved the token (priority from now on)."""
        with self._lock:
            self._known[host] = None
            self._known.move_to_end(host)
            while len(self._known) > _MAX_REMEMBERED_HOSTS:
                self._known.popitem(last=False)

    # ----- admission ---------------------------------------------------------------------------
    def admit(self, sock: socket.socket, host: str) -> Slot | None:
        """A slot for a new connection from ``host``, or None (the caller closes it: refused).
        May evict an older handshake (its socket is shut down, so its thread fails at once)."""
        victim: Slot | None = None
        with self._lock:
            priority = host in self._expected or host in self._known
            own = [s for s in self._active if s.host == host]
            if len(own) >= self.max_per_source:
                if not priority:
                    self._count_and_log(host, "too many handshakes from this source")
                    return None
                victim = own[0]
            elif len(self._active) >= self.max_total:
                strangers = [s for s in self._active if not s.priority]
                now = time.monotonic()
                if strangers and (priority or now - strangers[0].started > self.stale_s):
                    victim = strangers[0]
                elif priority:
                    victim = self._active[0]
                else:
                    self._count_and_log(host, "too many handshakes in progress")
                    return None
            if victim is not None:
                self._active.remove(victim)
                victim.evicted = True
                self.num_evicted += 1
            slot = Slot(host=host, sock=sock, priority=priority)
            self._active.append(slot)
        if victim is not None:
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)
        return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            if slot in self._active:
                self._active.remove(slot)

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._active)

    # ----- rejections --------------------------------------------------------------------------
    def rejected(self, host: str, reason: str) -> None:
        """Counts a connection refused or failed before authentication; logs the first per host."""
        with self._lock:
            self._count_and_log(host, reason)

    def _count_and_log(self, host: str, reason: str) -> None:
        self.num_rejected += 1
        first = host not in self._logged
        if first:
            self._logged[host] = None
            while len(self._logged) > _MAX_REMEMBERED_HOSTS:
                self._logged.popitem(last=False)
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "%s: refused a connection from %s: %s%s",
            self.name,
            host,
            reason,
            " (further refusals from this source are logged at DEBUG)" if first else "",
        )
