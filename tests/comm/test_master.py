"""The master: admission, membership, heartbeats, garbage input, restart, the `lowcomm master` command."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch
from _control_harness import TOKEN, addr, communicator, connect_all, run_threads, start_master

from lowcomm.comm import Communicator, Master, _frames, _handshake
from lowcomm.comm._protocol import (
    KIND_REQUEST,
    KIND_RESPONSE,
    ErrorCode,
    GateKind,
    GateRequest,
    error_for,
    parse_request,
    to_wire,
)
from lowcomm.comm.errors import AuthenticationError, PeerFailureError, ProtocolError, TopologyError
from lowcomm.faults import FaultInjector
from tests._tokens import OTHER_TOKEN


@pytest.mark.timeout(60)
def test_first_peer_is_accepted_and_joiners_wait_for_update_topology() -> None:
    master = start_master()
    try:
        a = communicator(addr(master))
        a.connect(timeout_s=10)
        assert a.world_size == 1 and a.rank == 0
        b = communicator(addr(master))
        results = run_threads([lambda: b.connect(timeout_s=20), lambda: _admit(a, 2)])
        assert results == [None, None]
        assert a.world_size == b.world_size == 2
        assert (a.rank, b.rank) == (0, 1)
        assert master.snapshot()["pending"] == []
        a.close()
        b.close()
    finally:
        master.stop()


def _admit(comm: Communicator, world: int) -> None:
    deadline = time.monotonic() + 20
    while comm.world_size < world and time.monotonic() < deadline:
        if comm.are_peers_pending(timeout_s=10):
            comm.update_topology(timeout_s=10)
        else:
            time.sleep(0.05)


@pytest.mark.timeout(60)
def test_peers_download_the_runs_config_blob() -> None:
    master = start_master(config_blob=b'{"model": "gpt", "sync_every": 50}')
    try:
        (a,) = connect_all(addr(master), 1)
        assert a.config_blob == b'{"model": "gpt", "sync_every": 50}'
        a.close()
    finally:
        master.stop()


@pytest.mark.timeout(60)
def test_wrong_token_is_refused_with_a_clear_error_on_the_joiner() -> None:
    master = start_master()
    try:
        intruder = Communicator(addr(master), token=OTHER_TOKEN)
        with pytest.raises(AuthenticationError, match="run token rejected"):
            intruder.connect(timeout_s=10)
        intruder.close()
        assert master.snapshot()["accepted"] == []
        assert master.snapshot()["num_rejected_connections"] >= 1
    finally:
        master.stop()


def _rejected(master: Master) -> int:
    return int(master.snapshot()["num_rejected_connections"])


def _raw(master: Master, data: bytes) -> bytes:
    with socket.create_connection(master.address, timeout=5) as s:
        s.sendall(data)
        s.settimeout(5)
        try:
            return s.recv(1024)
        except (TimeoutError, ConnectionError):
            return b""


@pytest.mark.timeout(60)
def test_garbage_and_oversized_frames_leave_the_master_serving() -> None:
    master = start_master()
    try:
        before = _rejected(master)
        _raw(master, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)  # not a lowcomm frame
        # A valid header announcing a 2**40-byte handshake frame: refused before any payload.
        _raw(master, _frames.HEADER.pack(_frames.MAGIC, _frames.VERSION, 1, 0, 0, 0, 2**40))
        _raw(master, struct.pack("!4sB", _frames.MAGIC, 99) + b"\0" * 40)  # another wire version
        # An authenticated connection that sends a frame over the control bound, then junk JSON.
        conn, _ = _handshake.connect(
            master.address, token=TOKEN, hello={"role": "test"}, timeout_s=5
        )
        conn.send_frame(KIND_REQUEST, b"{not json", timeout_s=5)
        with pytest.raises(Exception):  # noqa: B017 - the master closed the connection
            conn.recv_json(timeout_s=5)
        conn, _ = _handshake.connect(
            master.address, token=TOKEN, hello={"role": "test"}, timeout_s=5
        )
        conn.send_json(KIND_REQUEST, {"op": "no-such-op"}, timeout_s=5)
        with pytest.raises(Exception):  # noqa: B017
            conn.recv_json(timeout_s=5)
        deadline = time.monotonic() + 10
        while _rejected(master) < before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _rejected(master) >= before + 5
        # ... and it still admits and serves real peers.
        comms = connect_all(addr(master), 2)
        assert [c.world_size for c in comms] == [2, 2]
        for c in comms:
            c.close()
    finally:
        master.stop()


@pytest.mark.timeout(60)
def test_a_peer_that_stops_heartbeating_is_evicted_after_the_timeout() -> None:
    master = start_master(heartbeat_timeout_s=2.0)
    try:
        (a,) = connect_all(addr(master), 1)
        # A registered "peer" that never heartbeats (a raw session that goes silent).
        conn, _ = _handshake.connect(
            master.address, token=TOKEN, hello={"role": "session"}, timeout_s=5
        )
        conn.send_json(
            KIND_REQUEST,
            {"op": "register", "peer_id": "silent", "peer_group": 0, "address": ["127.0.0.1", 9]},
            timeout_s=5,
        )
        kind, _, resp = conn.recv_json(timeout_s=5)
        assert kind == KIND_RESPONSE and resp["accepted"] is False
        a.update_topology(timeout_s=10)
        assert a.world_size == 2
        start = time.monotonic()
        while "silent" not in master.snapshot()["evicted"] and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert "no heartbeat" in master.snapshot()["evicted"]["silent"]
        # The survivor's next phase sees the smaller world instead of waiting for the silent one.
        a.update_topology(timeout_s=10)
        assert a.world_size == 1
        conn.close()
        a.close()
    finally:
        master.stop()


def _start_master_process(port: int = 0) -> tuple[subprocess.Popen[str], int]:
    token_file = "/tmp/lowcomm-test-token"
    with open(token_file, "wb") as f:
        f.write(TOKEN + b"\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lowcomm.launch.cli",
            "master",
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            token_file,
            "--heartbeat-timeout",
            "3",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"listening on [\d.]+:(\d+)", line)
    assert m, f"unexpected master output {line!r}"
    return proc, int(m.group(1))


@pytest.mark.timeout(120)
def test_master_restart_mid_run_peers_re_register_and_carry_on() -> None:
    proc, port = _start_master_process()
    procs = [proc]
    try:
        comms = connect_all(f"127.0.0.1:{port}", 2)
        xs = [torch.full((1000,), float(i + 1)) for i in range(2)]
        run_threads(
            [
                lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=20)
                for c, x in zip(comms, xs, strict=True)
            ]
        )
        assert all(torch.equal(x, torch.full((1000,), 3.0)) for x in xs)
        # Kill the master between operations and start a new one on the same port.
        proc.kill()
        proc.wait(10)
        time.sleep(0.5)
        proc2, port2 = _start_master_process(port)
        procs.append(proc2)
        assert port2 == port
        res = run_threads(
            [
                lambda c=c, x=x: c.all_reduce(x, "sum", timeout_s=40)
                for c, x in zip(comms, xs, strict=True)
            ],
            timeout_s=60,
        )
        assert [type(r).__name__ for r in res] == ["AllReduceInfo"] * 2, res
        assert all(torch.equal(x, torch.full((1000,), 6.0)) for x in xs)
        assert [c.world_size for c in comms] == [2, 2]

        # A restart while a peer waits inside a phase: it re-registers and keeps waiting.
        def late() -> None:
            time.sleep(1.5)
            proc2.kill()
            proc2.wait(10)
            procs.append(_start_master_process(port)[0])
            comms[1].update_topology(timeout_s=30)

        res = run_threads([lambda: comms[0].update_topology(timeout_s=30), late], timeout_s=60)
        assert res == [None, None], res
        assert [c.world_size for c in comms] == [2, 2]
        for c in comms:
            c.close()
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


@pytest.mark.timeout(30)
def test_the_lowcomm_master_command_refuses_an_empty_token_file(tmp_path: object) -> None:
    import pathlib

    empty = pathlib.Path(str(tmp_path)) / "token"
    empty.write_bytes(b"\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowcomm.launch.cli",
            "master",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            str(empty),
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode != 0
    assert "is empty" in out.stderr


@pytest.mark.timeout(30)
def test_evicted_peers_get_a_clear_error_on_their_next_call() -> None:
    master = start_master(heartbeat_timeout_s=1.0)
    try:
        (a,) = connect_all(addr(master), 1)
        master.evict(a.peer_id, "test eviction")  # as the janitor would
        with pytest.raises(TopologyError, match="evicted"):
            a.update_topology(timeout_s=5)
        a.close()
    finally:
        master.stop()


@pytest.mark.parametrize(
    ("request_obj", "field"),
    [
        ({"op": "no-such-op"}, "op"),
        ({"op": "register", "peer_id": "p", "peer_group": -1, "address": ["h", 1]}, "peer_group"),
        ({"op": "register", "peer_id": "p", "peer_group": 0, "address": ["h", 70000]}, "address"),
        ({"op": "gate", "peer_id": "p", "kind": "barrier", "rid": "r"}, "kind"),
        ({"op": "gate", "peer_id": "p", "kind": "sync", "rid": "r", "wait_s": -1}, "wait_s"),
        ({"op": "vote", "peer_id": "p", "op_id": "o", "ok": "yes"}, "ok"),
        ({"op": "heartbeat", "peer_id": 7}, "peer_id"),
    ],
)
def test_a_malformed_request_is_a_protocol_error_naming_the_field(
    request_obj: dict[str, object], field: str
) -> None:
    with pytest.raises(ProtocolError, match=f"'{field}'"):
        parse_request(request_obj)


def test_a_request_travels_as_the_same_json_it_is_parsed_from() -> None:
    obj = {
        "op": "gate",
        "peer_id": "p",
        "kind": "all_reduce",
        "key": "3",
        "payload": {"numel": 10},
        "rid": "r",
        "nonfinite": False,
        "wait_s": 0.5,
    }
    req = parse_request(obj)
    assert isinstance(req, GateRequest) and req.kind is GateKind.ALL_REDUCE
    assert to_wire(req) == obj


def test_master_error_codes_map_to_the_error_class_that_says_what_to_do() -> None:
    assert type(error_for(ErrorCode.LOCKSTEP, "m")) is TopologyError
    assert type(error_for(ErrorCode.EVICTED, "m")) is TopologyError
    assert type(error_for(ErrorCode.UNKNOWN_PEER, "m")) is PeerFailureError
    assert type(error_for("from-a-newer-master", "m")) is ProtocolError


@pytest.mark.timeout(60)
def test_a_fault_at_master_request_fires_where_the_master_answers() -> None:
    faults = FaultInjector()
    faults.inject("master.request", delay_s=0.01, where={"op": "gate"}, times=None)
    master = start_master(faults=faults)
    try:
        a, b = connect_all(addr(master), 2)
        assert faults.hits("master.request") > 0
        fired = faults.fired("master.request")
        run_threads([lambda: a.update_topology(timeout_s=10), lambda: b.update_topology(10)])
        assert faults.fired("master.request") > fired  # every gate answer was delayed
        for c in (a, b):
            c.close()
    finally:
        master.stop()


_HOSTILE = [
    b'{"op": "register", "peer_id": "p", "peer_group": 1e400, "address": ["h", 1]}',
    b'{"op": "register", "peer_id": "p", "peer_group": 1' + b"0" * 300 + b', "address": ["h", 1]}',
    b'{"op": "register", "peer_id": "p", "peer_group": 1' + b"0" * 5000 + b', "address": ["h", 1]}',
    b'{"op": "register", "peer_id": "p", "peer_group": 0, "address": ["h", true]}',
    b'{"op": "gate", "peer_id": "p", "kind": "sync", "rid": "r", "wait_s": NaN}',
    b'{"op": "gate", "peer_id": "p", "kind": "sync", "rid": "r", "payload": [1]}',
    b'{"op": "vote", "peer_id": "p", "op_id": "o", "ok": true, "participants": [1]}',
    b'{"op": "heartbeat", "peer_id": "' + b"x" * 100_000 + b'"}',
    b'{"op": "heartbeat", "peer_id": "p", "secret": 12}',
    b'{"op": "register", "peer_id": "p", "peer_group": 0, "address": ["h", 1], '
    b'"last_op": {"op_id": "o", "group": 0, "participants": [], "state": "maybe"}}',
]


@pytest.mark.parametrize(
    ("request_obj", "field"),
    [
        (
            {"op": "register", "peer_id": "p", "peer_group": float("inf"), "address": ["h", 1]},
            "peer_group",
        ),
        (
            {"op": "register", "peer_id": "p", "peer_group": 10**300, "address": ["h", 1]},
            "peer_group",
        ),
        (
            {"op": "gate", "peer_id": "p", "kind": "sync", "rid": "r", "wait_s": float("nan")},
            "wait_s",
        ),
        ({"op": "status", "peer_id": "p", "wait_s": float("inf")}, "wait_s"),
        ({"op": "leave", "peer_id": "x" * 1000}, "peer_id"),
        ({"op": "vote", "peer_id": "p", "op_id": "o", "ok": True, "group": -1}, "group"),
    ],
)
def test_out_of_range_fields_are_a_protocol_error_naming_the_field(
    request_obj: dict[str, object], field: str
) -> None:
    with pytest.raises(ProtocolError, match=f"'{field}'") as info:
        parse_request(request_obj)
    assert len(str(info.value)) < 400  # the bad value is shown bounded, never whole


@pytest.mark.timeout(60)
def test_hostile_fields_are_each_one_counted_rejection_with_no_traceback(caplog) -> None:  # type: ignore[no-untyped-def]
    import threading

    crashed: list[object] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: crashed.append(args.exc_value)
    master = start_master()
    try:
        for i, payload in enumerate(_HOSTILE):
            before = _rejected(master)
            conn, _ = _handshake.connect(
                master.address, token=TOKEN, hello={"role": "test"}, timeout_s=5
            )
            conn.send_frame(KIND_REQUEST, payload, timeout_s=5)
            with pytest.raises(Exception):  # noqa: B017 - the master closed the connection
                conn.recv_json(timeout_s=5)
            deadline = time.monotonic() + 5
            while _rejected(master) == before and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _rejected(master) == before + 1, (i, payload[:80])
        assert crashed == [], crashed
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        (a,) = connect_all(addr(master), 1)  # still serving
        a.close()
    finally:
        threading.excepthook = old_hook
        master.stop()


@pytest.mark.timeout(60)
def test_a_token_holder_cannot_leave_heartbeat_or_vote_for_another_peer() -> None:
    master = start_master()
    try:
        a, b = connect_all(addr(master), 2)
        forged = [
            {"op": "leave", "peer_id": a.peer_id},
            {"op": "heartbeat", "peer_id": a.peer_id},
            {"op": "vote", "peer_id": a.peer_id, "op_id": "x-1", "ok": False},
            {"op": "leave", "peer_id": a.peer_id, "secret": "0" * 32},
        ]
        for request in forged:
            conn, _ = _handshake.connect(
                master.address, token=TOKEN, hello={"role": "control"}, timeout_s=5
            )
            conn.send_json(KIND_REQUEST, request, timeout_s=5)
            kind, _tag, resp = conn.recv_json(timeout_s=5)
            assert kind == KIND_RESPONSE and resp["error"] == ErrorCode.FORBIDDEN, resp
            conn.close()
        # A connection that proved it is b cannot speak for a either, even with b's secret.
        conn, _ = _handshake.connect(
            master.address, token=TOKEN, hello={"role": "control"}, timeout_s=5
        )
        secret = b._control._secret
        conn.send_json(
            KIND_REQUEST, {"op": "heartbeat", "peer_id": b.peer_id, "secret": secret}, timeout_s=5
        )
        assert "error" not in conn.recv_json(timeout_s=5)[2]
        conn.send_json(
            KIND_REQUEST, {"op": "leave", "peer_id": a.peer_id, "secret": secret}, timeout_s=5
        )
        assert conn.recv_json(timeout_s=5)[2]["error"] == ErrorCode.FORBIDDEN
        conn.close()
        assert error_for(ErrorCode.FORBIDDEN, "x").__class__ is AuthenticationError
        snap = master.snapshot()
        assert sorted(snap["accepted"]) == sorted([a.peer_id, b.peer_id]) and not snap["evicted"]
        x, y = torch.ones(3), torch.ones(3)
        res = run_threads(
            [
                lambda: a.all_reduce(x, "sum", timeout_s=10),
                lambda: b.all_reduce(y, "sum", timeout_s=10),
            ]
        )
        assert torch.equal(x, torch.full((3,), 2.0)), res
        a.close()
        b.close()
    finally:
        master.stop()
