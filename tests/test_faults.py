"""The one fault injector: rules match by point and context, count what fired, and refuse misuse."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from lowcomm.testing import KILLED_EXIT_CODE, POINTS, FaultInjector


def test_a_rule_fires_only_on_matching_context_after_the_clean_hits_it_lets_pass() -> None:
    faults = FaultInjector()
    faults.inject("ring.send", error=OSError("boom"), where={"step": 2}, after=1, times=2)
    faults.hit("ring.send", step=1, sub=0)  # no match
    faults.hit("ring.send", step=2, sub=0)  # matches, let through by after=1
    for sub in (1, 2):
        with pytest.raises(OSError, match="boom"):
            faults.hit("ring.send", step=2, sub=sub)
    faults.hit("ring.send", step=2, sub=3)  # times=2 used up: disarmed
    assert (faults.hits("ring.send"), faults.fired("ring.send")) == (5, 2)


def test_corrupt_is_handed_to_the_caller_and_only_where_a_caller_honours_it() -> None:
    faults = FaultInjector()
    faults.inject("local.write", corrupt=True)
    assert faults.hit("local.write") is True
    assert faults.hit("local.write") is False
    with pytest.raises(ValueError, match="cannot corrupt"):
        faults.inject("remote.put", corrupt=True)
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.inject("ring.sendd", kill=True)


def test_call_and_gate_actions_run_outside_the_lock() -> None:
    faults = FaultInjector()
    seen: list[dict[str, object]] = []
    gate = threading.Event()
    gate.set()
    faults.inject("p2p.send", call=lambda ctx: seen.append(dict(ctx)), gate=gate, times=None)
    faults.hit("p2p.send", peer="a", tag=3)
    faults.hit("p2p.send", peer="b", tag=4)
    assert seen == [{"peer": "a", "tag": 3}, {"peer": "b", "tag": 4}]
    assert faults.fired("p2p.send") == 2


def test_kill_ends_the_process_at_once_with_the_killed_exit_code() -> None:
    code = (
        "from lowcomm.testing import FaultInjector\n"
        "f = FaultInjector(); f.inject('trainer.inner_step', kill=True, where={'step': 3})\n"
        "for i in range(10):\n"
        "    f.hit('trainer.inner_step', step=i); print(i, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == KILLED_EXIT_CODE
    assert proc.stdout.split() == ["0", "1", "2"]


def test_every_point_is_documented_in_the_module_docstring() -> None:
    import lowcomm.faults

    for point in POINTS:
        assert f"``{point}``" in (lowcomm.faults.__doc__ or "")
