"""A writer killed with SIGKILL at random points never leaves a checkpoint that restore accepts."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_same, make_state

from lowcomm.checkpoint import CheckpointConfig, Checkpointer

HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(150)
def test_kill_9_at_random_points_twenty_times_restore_returns_the_last_committed_checkpoint(
    tmp_path: Path,
) -> None:
    root = str(tmp_path / "ckpt")
    server = subprocess.Popen(
        [sys.executable, str(HERE / "_crash_writer.py"), root, "32"],  # 4 MB of state per step
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(HERE.parent.parent),
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()

    def send(cmd: str) -> None:
        assert server.stdin is not None
        server.stdin.write(cmd + "\n")
        server.stdin.flush()

    def expect(prefix: str) -> str:
        while True:
            line = lines.get(timeout=60)
            if line.startswith("committed "):
                committed.append(int(line.split()[1]))
            if line.startswith(prefix):
                return line

    rng = random.Random(1234)
    committed: list[int] = []
    partial_seen = 0
    restored_steps = []
    try:
        for _ in range(20):
            send("fork")
            pid = int(expect("child ").split()[1])
            time.sleep(
                rng.uniform(0.05, 0.8)
            )  # a random point: restore, copy, write, fsync, commit
            os.kill(pid, signal.SIGKILL)
            send(f"reap {pid}")
            status = int(expect("reaped ").split()[1])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            while not lines.empty():  # commits printed just before the kill
                expect("committed ")
            dirs = sorted(p.name for p in Path(root).iterdir()) if os.path.isdir(root) else []
            partial_seen += sum(not (Path(root) / d / "MANIFEST.json").exists() for d in dirs)
            with Checkpointer(CheckpointConfig(levels=(root,))) as ck:
                if not committed:
                    continue
                state = ck.restore()
                assert ck.last_restore is not None
                step = ck.last_restore.step
            # Never older than what the writer reported durable; a newer one may have committed
            # between its commit and its print. Either way the content is exactly that step's.
            assert step >= max(committed)
            assert_same(make_state(step, scale=32), state)
            restored_steps.append(step)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert len(restored_steps) >= 15, restored_steps  # most kills came after some commit
    assert restored_steps == sorted(restored_steps)  # every restart continued from its restore
    assert partial_seen > 0  # some kills really landed mid-write and left uncommitted files
