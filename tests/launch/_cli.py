"""Running the ``lowcomm`` command in a subprocess, for the launch tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def lowcomm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowcomm.launch.cli", *args]


def env_with_path(*dirs: Path) -> dict[str, str]:
    """This process's environment with ``dirs`` put first on PYTHONPATH."""
    env = dict(os.environ)
    parts = [str(d) for d in dirs] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_lowcomm(
    *args: str, timeout_s: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lowcomm_cmd(*args), capture_output=True, text=True, timeout=timeout_s, env=env
    )


def stderr_lines(out: subprocess.CompletedProcess[str]) -> Sequence[str]:
    return [line for line in out.stderr.splitlines() if line.strip()]
