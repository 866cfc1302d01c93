"""A fork server for the crash test: forks writer children that checkpoint until they are killed.

Run as ``python _crash_writer.py DIR SCALE``. Each ``fork`` line on stdin forks a child that restores
the newest checkpoint in DIR (as a restarted job would), then saves step after step, printing
``committed <step>`` once each is durable. The parent answers ``child <pid>``; ``reap <pid>`` waits
for the (killed) child. Forking from this single-threaded process skips re-importing torch for each
of the test's writer processes.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_state

from lowcomm.checkpoint import CheckpointConfig, Checkpointer, NoCheckpointError


def writer(root: str, scale: int) -> None:
    ck = Checkpointer(CheckpointConfig(levels=(root,), chunk_bytes=64 << 10, keep_last_local=2))
    try:
        ck.restore()
        assert ck.last_restore is not None
        step = ck.last_restore.step
    except NoCheckpointError:
        step = 0
    while True:
        step += 1
        handle = ck.save(step, make_state(step, scale=scale))
        ck.wait_until_safe_to_mutate()
        handle.wait("local", timeout_s=60)
        # One write(2) under PIPE_BUF is atomic: a kill cannot cut the line and glue the parent's
        # next "reaped" line to it, as print's buffered write (text, then newline) could.
        os.write(1, f"committed {step}\n".encode())


def main() -> None:
    root, scale = sys.argv[1], int(sys.argv[2])
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    writer(root, scale)
                finally:
                    os._exit(1)
            print(f"child {pid}", flush=True)
        elif cmd[0] == "reap":
            _, status = os.waitpid(int(cmd[1]), 0)
            print(f"reaped {status}", flush=True)


if __name__ == "__main__":
    main()
