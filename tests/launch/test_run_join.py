"""``lowcomm run``: local peers over an emulated WAN (``lowcomm join``: test_volunteer.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


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
