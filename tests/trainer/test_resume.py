"""A replica SIGKILLed mid-run and restarted resumes from its own checkpoint and rejoins the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lowcomm.comm import Master
from lowcomm.faults import KILLED_EXIT_CODE
from tests.trainer._replica import TOKEN

REPO = Path(__file__).resolve().parents[2]


def _start(master: Master, index: int, root: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    address = "{}:{}".format(*master.address)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.trainer._replica",
            address,
            str(index),
            str(root),
            str(root / f"out{index}.jsonl"),
            *extra,
        ],
        cwd=REPO,
        env=env,
    )


def _events(root: Path, index: int) -> list[dict[str, Any]]:
    path = root / f"out{index}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(150)
def test_a_replica_killed_and_restarted_resumes_its_checkpoint_and_ends_bit_identical(
    tmp_path: Path,
) -> None:
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=5.0).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_start(master, 0, tmp_path))
        victim = _start(master, 1, tmp_path, "--kill-at", "14")
        procs.append(victim)
        assert victim.wait(timeout=90) == KILLED_EXIT_CODE  # the injected SIGKILL-like death
        before = _events(tmp_path, 1)
        assert [e["kind"] for e in before] == ["start", "first"]
        assert before[0]["resumed_from"] is None  # the first life started from nothing
        restarted = _start(master, 1, tmp_path, "--joining")
        procs.append(restarted)
        assert restarted.wait(timeout=90) == 0
        assert procs[0].wait(timeout=60) == 0
        start, first, done = _events(tmp_path, 1)[2:]
        # It loaded its own checkpoint: the newest one at or before the kill (every 3 steps).
        assert start["resumed_from"] in (9, 12)
        assert start["inner_step"] == start["position"] == start["resumed_from"]
        assert first["inner_step"] == first["position"] == start["resumed_from"] + 1
        # The run had moved on: it took the run's current outer state, not its checkpoint's.
        assert start["took_run_state"] is True
        assert start["outer_step"] > start["saved_outer_step"]
        ref = _events(tmp_path, 0)[-1]
        assert ref["kind"] == done["kind"] == "done"
        assert ref["join_step"] == start["outer_step"]
        assert ref["outer_step"] == done["outer_step"] == start["outer_step"] + 3
        assert ref["hash"] == done["hash"]
        assert ref["world_size"] == done["world_size"] == 2
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        master.stop()
