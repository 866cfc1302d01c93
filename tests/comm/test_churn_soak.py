"""The churn soak (benchmarks/churn_soak.py --quick) as a slow test: zero wrong results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_churn_soak_completes_operations_with_zero_wrong_results() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "churn_soak.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    claims = {c["name"]: c for c in json.loads(out.stdout.strip().splitlines()[-1])["claims"]}
    assert claims["wrong_results"]["value"] == 0
    assert claims["ops_completed"]["value"] > 0
    assert out.returncode == 0, out.stdout[-3000:]
