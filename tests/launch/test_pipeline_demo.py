"""``lowcomm demo --pipeline``: a stage killed mid micro-batch and rebuilt, shown to the user."""

from __future__ import annotations

import re

import pytest

from tests.launch._cli import run_lowcomm


@pytest.mark.timeout(300)
def test_the_pipeline_demo_shows_a_stage_killed_detected_rebuilt_and_the_step_retried() -> None:
    out = run_lowcomm(
        "demo", "--pipeline", "--pipeline-stages", "3", "--steps", "6", "--width", "16",
        "--context", "16", "--batch-size", "4",
        timeout_s=280,
    )  # fmt: skip
    text = out.stdout
    assert out.returncode == 0, text + out.stderr
    assert "stage 2 killed at step 3, mid micro-batch 0" in text  # the kill fired
    for stage in (0, 1, 3):  # every other stage aborted the step, with the delay since the kill
        assert re.search(rf"stage {stage} aborted step 3 \([0-9.]+ s after the kill\)", text), text
    # The rebuild event names the stage, the rule, its sources and the seconds it took.
    assert re.search(
        r"stage 2 rebuilt at step 3 by rule checkfree from neighbour:1, neighbour:3 \(weights "
        r"[0-9.e-]+, [0-9.e-]+: gradient norms\), [0-9.]+ kB received, in [0-9.]+ s",
        text,
    ), text
    assert re.search(r"step 3 retried and committed \(voted by every stage\) [0-9.]+ s after", text)
    assert "pipeline finished 6 steps" in text
    # The step is never applied twice: one loss line per step.
    assert [int(s) for s in re.findall(r"^step +(\d+): loss", text, re.M)] == list(range(6))


def test_the_pipeline_demo_refuses_a_kill_without_a_middle_stage() -> None:
    out = run_lowcomm("demo", "--pipeline", "--pipeline-stages", "2", timeout_s=60)
    assert out.returncode != 0
    assert "--pipeline-stages >= 3" in out.stdout + out.stderr
