"""``lowcomm join``: a volunteer trains the run's task, resumes its own checkpoint, leaves on Ctrl-C,
and the run outlives its peers through its remote level."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from lowcomm.comm import Master
from tests.launch._cli import env_with_path, lowcomm_cmd, run_lowcomm

TOKEN = b"volunteer-secret-0123456789abcdef"
TINY = "lowcomm.launch.tasks:tinygpt"
TINY_SETTINGS = """
[settings]
num_layers = 1
width = 32
num_heads = 2
context = 32
batch_size = 8
corpus_bytes = 200000
"""


def _config(
    task: str = TINY, *, remote: Path | None = None, extra: str = TINY_SETTINGS, top: str = ""
) -> str:
    text = f'task = "{task}"\n{top}\n{extra}\n[outer]\nmethod = "async"\nsync_every = 4\n'
    if remote is not None:
        text += f'[checkpoint]\nremote = "file://{remote}"\n'
    return text


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    return path


def _master(config: str) -> tuple[Master, str]:
    master = Master(("127.0.0.1", 0), token=TOKEN, config_blob=config.encode()).start()
    return master, "{}:{}".format(*master.address)


def _join(address: str, token: Path, ckpt: Path, *args: str) -> list[str]:
    return lowcomm_cmd(
        "join", address, "--token-file", str(token), "--checkpoint-dir", str(ckpt), *args
    )


def _hash(out: str) -> str:
    found = re.findall(r"outer-hash (\w+)", out)
    assert found, out
    return found[-1]


@pytest.mark.timeout(120)
def test_a_volunteer_trains_a_task_from_its_own_package(tmp_path: Path, token_file: Path) -> None:
    pkg = tmp_path / "site" / "mytask"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(
        textwrap.dedent(
            """
            import torch
            from lowcomm.launch.task import Task

            def build(config):
                torch.manual_seed(0)
                model = torch.nn.Linear(config.settings["dim"], 1)
                gen = torch.Generator().manual_seed(config.seed)

                def batches():
                    while True:
                        x = torch.randn(16, config.settings["dim"], generator=gen)
                        yield x, x.sum(dim=1, keepdim=True)

                print("mytask built, dim", config.settings["dim"], flush=True)
                return Task(
                    model=model,
                    inner_optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
                    data=batches(),
                    loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                    tokens_per_batch=16,
                )
            """
        )
    )
    master, address = _master(_config("mytask.task:build", extra="[settings]\ndim = 3\n"))
    env = env_with_path(tmp_path / "site")
    try:
        refused = run_lowcomm(
            "join", address, "--token-file", str(token_file), "--task", TINY, env=env
        )
        out = run_lowcomm(
            "join", address, "--token-file", str(token_file), "--task", "mytask.task:build",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--outer-steps", "3", env=env,
        )  # fmt: skip
    finally:
        master.stop()
    assert refused.returncode == 1 and "mytask built" not in refused.stdout
    assert f"the run trains task mytask.task:build, not the {TINY}" in refused.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mytask built, dim 3" in out.stdout
    assert re.search(r"done at outer step [34]:", out.stdout), out.stdout


@pytest.mark.timeout(180)
def test_the_last_peer_leaves_and_the_next_continues_from_the_last_outer_step(
    tmp_path: Path, token_file: Path
) -> None:
    master, address = _master(_config(remote=tmp_path / "remote"))
    try:
        first = subprocess.run(
            _join(address, token_file, tmp_path / "a", "--task", TINY, "--outer-steps", "3"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert first.returncode == 0, first.stdout + first.stderr
        last = int(re.findall(r"done at outer step (\d+)", first.stdout)[0])
        second = subprocess.run(
            _join(address, token_file, tmp_path / "b", "--accept-task", "--outer-steps", "6"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        master.stop()
    assert second.returncode == 0, second.stdout + second.stderr
    # The newcomer (its own, empty checkpoint directory) takes the run's outer state: the same
    # outer step and bit-identical outer parameters and momentum (the hash covers them).
    resumed = re.findall(
        r"continuing the run from outer step (\d+).*outer-hash (\w+)", second.stderr
    )
    assert resumed == [(str(last), _hash(first.stdout))], second.stderr
    assert f"started the run: world of 1, outer step {last}" in second.stdout
    assert int(re.findall(r"done at outer step (\d+)", second.stdout)[0]) >= 6
    assert _hash(second.stdout) != _hash(first.stdout)  # and it trained on from there


@pytest.mark.timeout(180)
def test_a_killed_volunteer_resumes_from_its_own_checkpoint(
    tmp_path: Path, token_file: Path
) -> None:
    master, address = _master(_config())
    ckpt = tmp_path / "ckpt"
    try:
        proc = subprocess.Popen(
            _join(address, token_file, ckpt, "--task", TINY, "--checkpoint-every", "1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:  # one line per outer step when not on a terminal
            if line.startswith("outer step 4:"):
                break
        time.sleep(0.5)  # let the lazy checkpoint of outer step 4 commit
        proc.kill()  # SIGKILL: no goodbye, no final checkpoint
        proc.wait(timeout=30)
        out = run_lowcomm(
            "join", address, "--token-file", str(token_file), "--checkpoint-dir", str(ckpt),
            "--task", TINY, "--outer-steps", "6",
        )  # fmt: skip
    finally:
        master.stop()
    assert proc.returncode == -signal.SIGKILL
    assert out.returncode == 0, out.stdout + out.stderr
    resumed = re.findall(
        r"resumed from the local checkpoint of inner step (\d+) \(outer step (\d+)", out.stderr
    )
    assert resumed, out.stderr
    inner, outer = (int(v) for v in resumed[0])
    assert inner >= 12 and outer >= 3, resumed  # it did not start again from step 0
    assert "restored inner optimizer, data" in out.stderr
    assert f"started the run: world of 1, outer step {outer}" in out.stdout


@pytest.mark.timeout(180)
def test_ctrl_c_leaves_cleanly_and_the_master_logs_it_at_info(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lowcomm.comm")
    master, address = _master(_config())
    try:
        proc = subprocess.Popen(
            _join(address, token_file, tmp_path / "ckpt", "--task", TINY),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("outer step 2:"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while master.snapshot()["accepted"] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        master.stop()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert re.search(r"INFO lowcomm.launch.join_cmd: left the run at outer step \d+", err), err
    left = [r for r in caplog.records if "left the run" in r.getMessage()]
    assert left and all(r.levelno == logging.INFO for r in left)
    assert not [r for r in caplog.records if "evicted" in r.getMessage()]
    assert (tmp_path / "ckpt" / "local").is_dir()


@pytest.mark.timeout(240)
def test_two_volunteers_join_a_run_and_end_bit_identical(tmp_path: Path, token_file: Path) -> None:
    master, address = _master(_config(top="outer_steps = 8"))
    try:
        procs = [
            subprocess.Popen(
                _join(address, token_file, tmp_path / f"c{i}", "--task", TINY, "--index", str(i)),
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
    assert _hash(outs[0]) == _hash(outs[1]), outs
    assert sum("joined the run: world of 2" in o for o in outs) == 1, outs
