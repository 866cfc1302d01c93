"""``lowcomm run`` and ``lowcomm join``: local peers over an emulated WAN; volunteers joining a run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowcomm.comm import Master
from lowcomm.launch.join_cmd import parse_run_config
from tests._tokens import TOKEN


def _lowcomm(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowcomm.launch.cli", *args]


@pytest.mark.timeout(240)
def test_run_trains_local_peers_to_bit_identical_outer_params() -> None:
    out = subprocess.run(
        _lowcomm(
            "run", "--peers", "2", "--steps", "40", "--sync-every", "10", "--width", "32",
            "--layers", "1", "--context", "32", "--method", "streaming",
        ),
        capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"streaming: 40 inner steps, 8 outer steps", out.stdout), out.stdout
    assert "bit-identical on all 2 peers" in out.stdout


@pytest.mark.timeout(240)
def test_two_volunteers_join_a_run_and_end_bit_identical(tmp_path: Path) -> None:
    config = {"outer": {"method": "async", "sync_every": 5}, "gpt": {"num_layers": 1, "width": 32,
              "num_heads": 2, "context": 32}, "batch_size": 8, "outer_steps": 40}  # fmt: skip
    token = tmp_path / "token"
    token.write_bytes(TOKEN + b"\n")
    master = Master(("127.0.0.1", 0), token=TOKEN, config_blob=json.dumps(config).encode()).start()
    try:
        address = "{}:{}".format(*master.address)
        procs = [
            subprocess.Popen(
                _lowcomm("join", address, "--token-file", str(token), "--index", str(i)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=200)[0] for p in procs]
    finally:
        master.stop()
    assert all(p.returncode == 0 for p in procs), outs
    hashes = [re.findall(r"outer-hash (\w+)", o) for o in outs]
    assert hashes[0] and hashes[0] == hashes[1], outs
    assert sum("joined the run: world of 2" in o for o in outs) == 1, outs


def test_run_config_rejects_unknown_keys_and_bad_values() -> None:
    assert parse_run_config(b"")["outer"].method == "async"
    with pytest.raises(ValueError, match="unknown run configuration keys"):
        parse_run_config(b'{"outr": {}}')
    with pytest.raises(ValueError, match="not JSON"):
        parse_run_config(b"{nope")
    with pytest.raises(ValueError, match="sync_every"):
        parse_run_config(b'{"outer": {"sync_every": 0}}')
