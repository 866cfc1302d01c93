"""CLI errors are one line on stderr naming the problem and the fix, with a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from lowcomm.comm import Master
from tests.launch._cli import lowcomm_cmd, run_lowcomm, stderr_lines

TASK = "lowcomm.launch.tasks:tinygpt"


def _one_error_line(out: subprocess.CompletedProcess[str], *fragments: str) -> str:
    lines = stderr_lines(out)
    assert out.returncode == 1, out.stdout + out.stderr
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_join_with_a_missing_token_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "token"
    out = run_lowcomm("join", "127.0.0.1:1", "--token-file", str(missing), "--task", TASK)
    _one_error_line(out, "lowcomm join: error:", f"token file {missing} does not exist")


def test_join_to_an_unreachable_master_names_the_address() -> None:
    address = f"127.0.0.1:{_free_port()}"
    out = run_lowcomm("join", address, "--task", TASK, "--timeout", "2")
    _one_error_line(out, f"cannot reach the master at {address}", "lowcomm master")


def test_join_with_a_wrong_token_says_the_master_refused_it(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("not-the-run-token-0123456789\n")
    master = Master(("127.0.0.1", 0), token=b"the-run-token-0123456789abcdef").start()
    try:
        address = "{}:{}".format(*master.address)
        out = run_lowcomm("join", address, "--token-file", str(token), "--task", TASK)
    finally:
        master.stop()
    _one_error_line(out, f"the master at {address} refused this peer's run token", "--token-file")


def test_master_on_an_address_in_use_names_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        out = run_lowcomm("master", "--listen", address)
    _one_error_line(out, f"cannot listen on {address}: the address is in use", "--listen")


def test_master_rejects_a_malformed_run_config_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('task = "mypkg.task:build"\n[outer]\nsync_every = 0\n')
    out = run_lowcomm("master", "--config", str(config), "--listen", "127.0.0.1:0")
    _one_error_line(out, "run.toml: [outer].sync_every must be >= 1, got 0")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[outer]\nsync_every = 0\n")
    out = run_lowcomm("--debug", "master", "--config", str(config))
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "task is missing" in out.stderr


@pytest.mark.timeout(60)
def test_master_without_a_token_warns() -> None:
    proc = subprocess.Popen(
        lowcomm_cmd("master", "--listen", "127.0.0.1:0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert "lowcomm master listening on 127.0.0.1:" in proc.stdout.readline()
        warning = ""
        while "WARNING" not in warning:
            warning = proc.stderr.readline()
            assert warning, "the master never warned"
        assert "no --token-file: anyone who can reach" in warning
        assert "lowcomm token new" in warning
    finally:
        proc.terminate()
        proc.wait(timeout=10)
