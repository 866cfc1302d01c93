"""Ring set-up: ``connect_ring`` connects this peer to its two neighbours and returns its ``Ring``.

Who calls what: every peer creates one ``PeerListener``, then every member of a ring calls
``connect_ring`` with the same ``addresses`` (ring order) and ``ring_id``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from lowcomm.comm import _handshake
from lowcomm.comm._frames import DEFAULT_MAX_FRAME_BYTES, Connection
from lowcomm.comm.errors import TopologyError
from lowcomm.comm.listener import PeerListener
from lowcomm.comm.ring import DEFAULT_SUBCHUNK_BYTES, Ring
from lowcomm.comm.shaper import Shaper
from lowcomm.faults import FaultInjector

__all__ = ["RING_PURPOSE", "connect_ring"]

# The purpose a ring's connections announce in their hello (see PeerListener).
RING_PURPOSE = "ring"


def connect_ring(
    *,
    listener: PeerListener,
    rank: int,
    addresses: Sequence[tuple[str, int]],
    ring_id: str,
    token: bytes | str | None,
    num_connections: int = 4,
    timeout_s: float = 30.0,
    shaper: Shaper | None = None,
    subchunk_bytes: int = DEFAULT_SUBCHUNK_BYTES,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    thread_per_connection: bool = True,
    faults: FaultInjector | None = None,
    encryption: bool = True,
    overlap_cipher: bool = True,
) -> Ring:
    """Builds this peer's place in a ring: ``num_connections`` connections to the right-hand
    neighbour (``addresses[(rank + 1) % n]``), and as many accepted from the left-hand one.

    Every member calls it with the same ``addresses`` (the listeners' addresses, in ring order),
    ``ring_id`` and ``num_connections``; use a fresh ``ring_id`` for every new ring (for example the
    topology revision and attempt), so that stale connections of an older ring cannot be mistaken
    for new ones. Blocks up to ``timeout_s``.

    ``thread_per_connection``: True (default, for WAN links) gives each connection its own sending
    and receiving thread, so a stream whose window is full does not hold back the others. False
    uses one sending and one receiving thread that walk the connections in sub-chunk order: the
    same traffic with fewer context switches, faster when the CPU is the bottleneck (loopback,
    several peers per host: about 8% more bus bandwidth at 4 peers on the 2-core dev machine).

    ``faults``: the ring's sending threads hit its ``ring.send`` point before each sub-chunk
    leaves (see ``Ring``). ``encryption``: seal the ring's frames (see ``_handshake``; every
    member and its listener must agree). ``overlap_cipher``: seal and open a frame's records on a
    helper thread per connection direction, overlapped with the socket (``_cipher_thread``; the
    default); False does it on the ring's own threads, in turn with the socket calls (less CPU in
    thread hand-offs, for a host with no core to spare). A local choice: peers may differ.

    While it waits, the listener serves connections from the left neighbour's host before
    strangers' (``PeerListener.expecting``).

    Raises:
        CommTimeoutError: the left-hand neighbour did not connect in time.
        PeerFailureError, AuthenticationError: the right-hand neighbour is unreachable or refused.
        TopologyError: the left-hand neighbour disagrees on the ring (world size, rank, count).
    """
    n = len(addresses)
    if n < 1:
        raise ValueError("addresses must name at least this peer")
    if not 0 <= rank < n:
        raise ValueError(f"rank must be in [0, {n}), got {rank}")
    if num_connections < 1:
        raise ValueError(f"num_connections must be >= 1, got {num_connections}")
    if subchunk_bytes < 4:
        raise ValueError(f"subchunk_bytes must be >= 4, got {subchunk_bytes}")
    if n == 1:
        return Ring(
            rank=0,
            world_size=1,
            ring_id=ring_id,
            send=[],
            recv=[],
            subchunk_bytes=subchunk_bytes,
            faults=faults,
        )
    deadline = time.monotonic() + timeout_s
    left_host = str(addresses[(rank - 1) % n][0])
    with listener.expecting([left_host]):
        return _connect(
            listener=listener,
            rank=rank,
            addresses=addresses,
            ring_id=ring_id,
            token=token,
            num_connections=num_connections,
            deadline=deadline,
            shaper=shaper,
            subchunk_bytes=subchunk_bytes,
            max_frame_bytes=max_frame_bytes,
            thread_per_connection=thread_per_connection,
            faults=faults,
            encryption=encryption,
            overlap_cipher=overlap_cipher,
        )


def _connect(
    *,
    listener: PeerListener,
    rank: int,
    addresses: Sequence[tuple[str, int]],
    ring_id: str,
    token: bytes | str | None,
    num_connections: int,
    deadline: float,
    shaper: Shaper | None,
    subchunk_bytes: int,
    max_frame_bytes: int,
    thread_per_connection: bool,
    faults: FaultInjector | None,
    encryption: bool,
    overlap_cipher: bool,
) -> Ring:
    n = len(addresses)
    right_host, right_port = addresses[(rank + 1) % n]
    send: list[Connection] = []
    recv: list[Connection] = []
    try:
        for index in range(num_connections):
            conn, _ = _handshake.connect(
                (str(right_host), int(right_port)),
                token=token,
                hello={
                    "purpose": RING_PURPOSE,
                    "key": ring_id,
                    "rank": rank,
                    "world_size": n,
                    "index": index,
                    "num_connections": num_connections,
                },
                timeout_s=max(deadline - time.monotonic(), 1e-3),
                max_frame_bytes=max_frame_bytes,
                shaper=shaper,
                encryption=encryption,
            )
            send.append(conn)
        arrived = listener.wait_for(
            RING_PURPOSE,
            ring_id,
            count=num_connections,
            timeout_s=max(deadline - time.monotonic(), 1e-3),
        )
        by_index: dict[int, Connection] = {}
        left_rank = (rank - 1) % n
        for conn, hello in arrived:
            recv.append(conn)  # closed with the rest on error
            if (
                hello.get("rank") != left_rank
                or hello.get("world_size") != n
                or hello.get("num_connections") != num_connections
                or not isinstance(hello.get("index"), int)
                or hello["index"] in by_index
            ):
                raise TopologyError(
                    f"ring {ring_id!r}: a connection from {conn.peer} claims rank "
                    f"{hello.get('rank')} of {hello.get('world_size')} with "
                    f"{hello.get('num_connections')} connections (index {hello.get('index')}); "
                    f"this peer (rank {rank} of {n}, {num_connections} connections) expected its "
                    f"left neighbour, rank {left_rank}: the peers disagree on the ring"
                )
            by_index[hello["index"]] = conn
        if sorted(by_index) != list(range(num_connections)):
            raise TopologyError(
                f"ring {ring_id!r}: connection indices {sorted(by_index)} are wrong"
            )
        recv = [by_index[i] for i in range(num_connections)]
    except BaseException:
        for conn in send + recv:
            conn.close()
        raise
    for conn in send + recv:
        conn.overlap_cipher = overlap_cipher
    return Ring(
        rank=rank,
        world_size=n,
        ring_id=ring_id,
        send=send,
        recv=recv,
        subchunk_bytes=subchunk_bytes,
        thread_per_connection=thread_per_connection,
        faults=faults,
    )
