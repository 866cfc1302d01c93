"""The ``lowcomm`` command: help, version, and the demo's quick-start path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lowcomm


def _lowcomm(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lowcomm.launch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_version_prints_the_package_version() -> None:
    out = _lowcomm("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"lowcomm {lowcomm.__version__}"


def test_help_lists_the_subcommands() -> None:
    out = _lowcomm("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_no_subcommand_prints_help_and_fails() -> None:
    out = _lowcomm()
    assert out.returncode == 2
    assert "usage: lowcomm" in out.stdout


def test_unknown_subcommand_is_rejected_with_a_clear_error() -> None:
    out = _lowcomm("no-such-command")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_demo_runs_to_completion_on_loopback(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    # The demo's own path with small flags: 3 peers, one killed half-way, resuming its checkpoint.
    out = _lowcomm(
        "demo", "--peers", "3", "--steps", "40", "--sync-every", "10", "--width", "32",
        "--layers", "1", "--context", "32", "--dp-max-seconds", "5", "--plot", str(plot),
        timeout_s=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "peer 2 killed at inner step 25" in out.stdout
    # It resumes from its newest durable checkpoint (step 21 on a quiet machine, step 11 when the
    # step-21 save is still in flight at the kill: async's outer steps land 1 inner step into the
    # next round, its default apply_after_steps at H=10; 10/20 with the full-round delay); on a
    # loaded host the kill can land before any
    # save is durable, and then the demo says it rejoined fresh (test_volunteer.py and
    # tests/trainer/test_resume.py assert the resume itself).
    assert re.search(
        r"peer 2 (resumed from its own checkpoint at inner step (10|11|20|21)\b|had no durable "
        r"checkpoint yet when it was killed)",
        out.stdout,
    ), out.stdout
    assert "outer parameters bit-identical on all 3 peers" in out.stdout
    assert "data-parallel" in out.stdout
    assert plot.stat().st_size > 1000
