"""Round trips, verification, retention, the lazy barrier and failure handling of ``Checkpointer``."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same, free_port, make_state

from lowcomm.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointTimeoutError,
    CheckpointWriteError,
    NoCheckpointError,
)
from lowcomm.faults import FaultInjector

pytestmark = pytest.mark.timeout(120)


def _ckpt(*levels: str, **kw: Any) -> Checkpointer:
    faults = kw.pop("faults", None)
    kw.setdefault("chunk_bytes", 16 << 10)  # many chunks even for small states
    return Checkpointer(CheckpointConfig(levels=levels, **kw), faults=faults)


def _data_file(root: Path, step: int) -> Path:
    return root / f"step_{step:012d}" / "rank_00000.data"


@pytest.mark.parametrize("compression", ["none", "zstd", "shuffle-zstd"])
def test_round_trip_is_bit_exact_at_host_local_and_remote_levels(
    tmp_path: Path, compression: str
) -> None:
    if compression != "none":
        pytest.importorskip("zstandard")
    state = make_state(7, scale=4)
    with _ckpt(
        "host://", str(tmp_path / "local"), f"file://{tmp_path}/remote", compression=compression
    ) as ck:
        handle = ck.save(7, state, metadata={"loss": 1.25})
        ck.wait_until_safe_to_mutate()
        handle.wait("remote", timeout_s=60)
        assert [(i.step, i.levels) for i in ck.checkpoints()] == [(7, ("host", "local", "remote"))]
        for level in ("host", "local", "remote"):
            restored = ck.restore(levels=[level])
            assert ck.last_restore is not None
            assert (ck.last_restore.step, ck.last_restore.level) == (7, level)
            assert ck.last_restore.metadata == {"loss": 1.25}
            assert_same(state, restored)
    if compression != "none":  # the codec really ran: random fp32 still shrinks a little
        assert (
            _data_file(tmp_path / "local", 7).stat().st_size
            < sum(
                t.numel() * t.element_size()
                for t in (state["model"]["w"], state["optim"]["state"][0]["exp_avg"])
            )
            + 64 * 1024
        )


def test_streaming_writes_behind_a_slow_copy_still_round_trip_bit_exact(tmp_path: Path) -> None:
    faults = FaultInjector()
    faults.inject("copy", delay_s=0.05, times=None)  # every tensor: writes overtake nothing
    state = make_state(5, scale=8)
    with _ckpt(
        str(tmp_path / "local"), faults=faults, stream_during_copy=True, staging="copy"
    ) as ck:
        ck.save(5, state).wait("local", timeout_s=60)
        assert faults.fired("copy") == 8  # the eight tensors of make_state
        assert faults.hits("local.write") > 1
        assert_same(state, ck.restore())


def test_remote_level_on_a_real_s3_server_restores_after_the_local_dir_is_deleted(
    tmp_path: Path, s3_server: dict[str, Any]
) -> None:
    url = "s3://lowcomm-ckpt/roundtrip"
    local = tmp_path / "local"
    with _ckpt(str(local), url, remote_options=s3_server) as ck:
        for step in (1, 2):
            ck.save(step, make_state(step)).wait("remote", timeout_s=60)
            ck.wait_until_safe_to_mutate()
    import shutil

    import s3fs

    keys = s3fs.S3FileSystem(**s3_server).find("lowcomm-ckpt/roundtrip")
    assert any(k.endswith("MANIFEST.json") for k in keys), (
        keys
    )  # the objects really are on the server
    shutil.rmtree(local)
    with _ckpt(str(local), url, remote_options=s3_server) as fresh:
        assert [(i.step, i.levels) for i in fresh.checkpoints()] == [
            (1, ("remote",)),
            (2, ("remote",)),
        ]
        restored = fresh.restore()
        assert fresh.last_restore is not None and fresh.last_restore.level == "remote"
        assert_same(make_state(2), restored)


def test_flipped_byte_in_a_shard_is_detected_and_restore_falls_back_to_the_previous_step(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local"
    faults = FaultInjector()
    with _ckpt(str(local), faults=faults) as ck:
        for step in (1, 2):
            if step == 2:  # one chunk of step 2 reaches the disk damaged, after its checksum
                faults.inject("local.write", corrupt=True, after=1)
            ck.save(step, make_state(step)).wait("local", timeout_s=60)
            ck.wait_until_safe_to_mutate()
    assert faults.fired("local.write") == 1
    with _ckpt(str(local)) as ck:
        restored = ck.restore()
        report = ck.last_restore
        assert report is not None and report.step == 1
        assert len(report.skipped) == 1 and "step 2 at local" in report.skipped[0]
        assert "checksum mismatch" in report.skipped[0]
        assert_same(make_state(1), restored)
        with pytest.raises(NoCheckpointError, match="checksum mismatch"):
            ck.restore(step=2)


def test_corrupt_local_copy_falls_back_to_the_remote_copy_of_the_same_step(tmp_path: Path) -> None:
    local = tmp_path / "local"
    with _ckpt(str(local), f"file://{tmp_path}/remote") as ck:
        ck.save(4, make_state(4)).wait("remote", timeout_s=60)
    manifest = local / "step_000000000004" / "MANIFEST.json"
    text = manifest.read_bytes()
    manifest.write_bytes(text.replace(b'"step\\":4', b'"step\\":5'))  # a flipped digit in the body
    assert manifest.read_bytes() != text
    with _ckpt(str(local), f"file://{tmp_path}/remote") as ck:
        restored = ck.restore()
        assert ck.last_restore is not None
        assert (ck.last_restore.step, ck.last_restore.level) == (4, "remote")
        assert "manifest checksum mismatch" in ck.last_restore.skipped[0]
        assert_same(make_state(4), restored)


def test_restore_into_a_template_fills_its_own_tensors_and_survives_a_corrupt_newest_step(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local"
    with _ckpt(str(local)) as ck:
        for step in (1, 2):
            ck.save(step, make_state(step)).wait("local", timeout_s=60)
    path = _data_file(local, 2)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x10  # in the last chunk: the earlier ones were already read into the template
    path.write_bytes(bytes(blob))
    template = make_state(9)
    ptr = template["model"]["w"].data_ptr()
    with _ckpt(str(local)) as ck:
        restored = ck.restore(into=template)
        assert ck.last_restore is not None and ck.last_restore.step == 1
    assert restored is template and template["model"]["w"].data_ptr() == ptr
    assert_same(make_state(1), template)


def test_truncated_data_file_is_rejected(tmp_path: Path) -> None:
    local = tmp_path / "local"
    with _ckpt(str(local)) as ck:
        ck.save(3, make_state(3)).wait("local", timeout_s=60)
    path = _data_file(local, 3)
    os.truncate(path, path.stat().st_size - 10)
    with _ckpt(str(local)) as ck, pytest.raises(NoCheckpointError, match="bytes, manifest says"):
        ck.restore()


def test_retention_keeps_the_last_n_per_level_plus_every_kth_step(tmp_path: Path) -> None:
    local = tmp_path / "local"
    with _ckpt(
        "host://",
        str(local),
        f"file://{tmp_path}/remote",
        keep_last_local=2,
        keep_last_remote=3,
        keep_every=3,
    ) as ck:
        for step in range(1, 11):
            ck.save(step, make_state(step)).wait("remote", timeout_s=60)
            ck.wait_until_safe_to_mutate()
        by_level: dict[str, list[int]] = {"host": [], "local": [], "remote": []}
        for info in ck.checkpoints():
            for level in info.levels:
                by_level[level].append(info.step)
    assert by_level == {"host": [10], "local": [3, 6, 9, 10], "remote": [3, 6, 8, 9, 10]}
    steps = sorted(p.name for p in local.iterdir() if not p.name.startswith("."))
    assert steps == [f"step_{s:012d}" for s in (3, 6, 9, 10)]
    assert len(list((local / ".recycle").iterdir())) == 1  # one data file kept for reuse


def test_recycled_data_files_of_deleted_checkpoints_are_rewritten_exactly(tmp_path: Path) -> None:
    local = tmp_path / "local"
    with _ckpt(str(local), keep_last_local=1) as ck:
        ck.save(1, make_state(1, scale=8)).wait("local", timeout_s=60)  # a large file
        ck.save(2, make_state(2, scale=1)).wait("local", timeout_s=60)  # step 1 -> .recycle
        recycled = list((local / ".recycle").iterdir())
        assert (
            len(recycled) == 1 and recycled[0].stat().st_size > _data_file(local, 2).stat().st_size
        )
        inode = recycled[0].stat().st_ino
        ck.save(3, make_state(3, scale=2)).wait("local", timeout_s=60)  # rewrites it, smaller
        assert _data_file(local, 3).stat().st_ino == inode  # the very same file, reused
        assert_same(make_state(3, scale=2), ck.restore())


def test_remote_keeps_its_own_count(tmp_path: Path) -> None:
    with _ckpt(
        str(tmp_path / "l"), f"file://{tmp_path}/r", keep_last_local=1, keep_last_remote=3
    ) as ck:
        for step in range(1, 6):
            ck.save(step, make_state(step)).wait("remote", timeout_s=60)
        infos = {i.step: i.levels for i in ck.checkpoints()}
    assert infos == {3: ("remote",), 4: ("remote",), 5: ("local", "remote")}


def _slow_copy_then_mutate(
    tmp_path: Path, *, barrier: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    faults = FaultInjector()
    # The copier sleeps before its first tensor: deterministic, whatever the machine's load.
    faults.inject("copy", delay_s=0.5, times=1)
    weight = torch.arange(4096, dtype=torch.float32)
    original = weight.clone()  # the test's reference only; the library clones nothing
    with _ckpt("host://", str(tmp_path / f"l{barrier}"), faults=faults) as ck:
        handle = ck.save(1, {"w": weight})
        if barrier:
            ck.wait_until_safe_to_mutate(timeout_s=30)
        weight.add_(1.0)  # optimizer.step()
        handle.wait("local", timeout_s=30)
        restored = ck.restore(levels=["local"])["w"]
        host = ck.restore(levels=["host"])["w"]
        assert torch.equal(restored, host)
    return original, restored, faults.fired("copy")


def test_mutating_right_after_save_without_the_barrier_corrupts_the_checkpoint(
    tmp_path: Path,
) -> None:
    original, restored, fired = _slow_copy_then_mutate(tmp_path, barrier=False)
    assert fired == 1
    assert torch.equal(restored, original + 1.0)  # the checkpoint caught the post-step values


def test_the_barrier_before_optimizer_step_protects_the_copy(tmp_path: Path) -> None:
    original, restored, fired = _slow_copy_then_mutate(tmp_path, barrier=True)
    assert fired == 1
    assert torch.equal(restored, original)


def test_save_returns_before_the_copy_and_clones_nothing_on_the_caller(tmp_path: Path) -> None:
    faults = FaultInjector()
    faults.inject("copy", delay_s=0.3, times=1)
    with _ckpt("host://", faults=faults) as ck:
        handle = ck.save(1, {"w": torch.ones(10)})
        assert not handle.done("host")  # returned while the copier still sleeps
        ck.wait_until_safe_to_mutate(timeout_s=30)
        assert handle.done("host")


def test_a_slow_disk_applies_back_pressure_to_the_copy_not_to_save(tmp_path: Path) -> None:
    faults = FaultInjector()
    gate = threading.Event()
    faults.inject("local.write", gate=gate, times=None)  # the disk hangs until the gate opens
    with _ckpt("host://", str(tmp_path / "l"), faults=faults, keep_last_local=3) as ck:
        handles = [ck.save(step, make_state(step)) for step in (1, 2, 3)]  # none of them blocks
        handles[1].wait("host", timeout_s=30)  # the second buffer was free: copied
        time.sleep(0.3)
        # Both host buffers are held (the writer's and the newest snapshot's): the third copy waits.
        assert all(b.holders > 0 for b in ck._pool._buffers)
        assert not handles[2].done("host")
        assert faults.fired("local.write") >= 1
        gate.set()
        ck.wait_until_safe_to_mutate(timeout_s=60)
        for h in handles:
            h.wait("local", timeout_s=60)
        assert ck._pool.num_allocations == 2  # two buffers, reused
        for step in (1, 2, 3):
            assert_same(make_state(step), ck.restore(step=step))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Any:
    """A 256 KiB tmpfs: a real 'No space left on device' (needs root to mount)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_marks_the_level_failed_keeps_committed_checkpoints_and_training_goes_on(
    tiny_tmpfs: Path,
) -> None:
    small = {"w": torch.arange(1000, dtype=torch.float32), "pos": 1}
    big = {"w": torch.randn(200_000)}  # 800 KB: cannot fit
    with _ckpt(str(tiny_tmpfs)) as ck:
        ck.save(1, small).wait("local", timeout_s=30)
        handle = ck.save(2, big)
        ck.wait_until_safe_to_mutate(timeout_s=30)  # training is not held up by the failure
        with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
            handle.wait("local", timeout_s=30)
        cause = info.value.__cause__
        assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC  # the real fault fired
        assert [(f.step, f.level) for f in ck.pop_failures()] == [(2, "local")]
        assert [i.step for i in ck.checkpoints()] == [1]
        assert_same(small, ck.restore())
        small3 = {"w": torch.zeros(10), "pos": 3}
        ck.save(3, small3).wait("local", timeout_s=30)  # space was freed: later saves work
        assert_same(small3, ck.restore())


def test_permission_denied_is_reported_on_the_next_call_and_committed_data_is_untouched(
    tmp_path: Path,
) -> None:
    faults = FaultInjector()
    local = tmp_path / "local"
    with _ckpt(str(local), faults=faults, raise_on_failure=True) as ck:
        ck.save(1, make_state(1)).wait("local", timeout_s=30)
        before = _data_file(local, 1).read_bytes()
        faults.inject(
            "local.open", error=PermissionError(errno.EACCES, "Permission denied", str(local))
        )
        handle = ck.save(2, make_state(2))
        with pytest.raises(CheckpointWriteError, match="Permission denied"):
            handle.wait("local", timeout_s=30)
        assert faults.fired("local.open") == 1
        with pytest.raises(CheckpointWriteError, match="step 2 could not be written"):
            ck.wait_until_safe_to_mutate()  # the next call surfaces it (raise_on_failure=True)
        ck.wait_until_safe_to_mutate()  # reported once: training goes on
        assert _data_file(local, 1).read_bytes() == before
        assert_same(make_state(1), ck.restore())
        ck.save(3, make_state(3)).wait("local", timeout_s=30)
        assert [i.step for i in ck.checkpoints()] == [1, 3]


def test_unreachable_remote_fails_only_the_remote_level(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: connection refused
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
        "skip_instance_cache": True,
    }
    with _ckpt(
        str(tmp_path / "local"), "s3://lowcomm-ckpt/unreachable", remote_options=options
    ) as ck:
        handle = ck.save(1, make_state(1))
        handle.wait("local", timeout_s=30)
        with pytest.raises(CheckpointWriteError, match="could not be uploaded") as info:
            handle.wait("remote", timeout_s=90)
        assert "connect" in str(info.value).lower()  # the real connection failure, not a hook
        assert [(f.step, f.level) for f in ck.pop_failures()] == [(1, "remote")]
        assert_same(make_state(1), ck.restore())


def test_copy_failure_fails_every_level_of_that_step(tmp_path: Path) -> None:
    faults = FaultInjector()
    faults.inject("copy", error=RuntimeError("injected copy fault"))
    with _ckpt("host://", str(tmp_path / "l"), faults=faults) as ck:
        handle = ck.save(1, make_state(1))
        for level in ("host", "local"):
            with pytest.raises(CheckpointWriteError, match="injected copy fault"):
                handle.wait(level, timeout_s=30)
        assert faults.fired("copy") == 1
        assert ck.checkpoints() == []
        ck.save(2, make_state(2)).wait("local", timeout_s=30)
        assert_same(make_state(2), ck.restore())


def test_bad_configuration_is_rejected_with_a_message_naming_the_field() -> None:
    with pytest.raises(ValueError, match="keep_last_local"):
        CheckpointConfig(levels=("/tmp/x",), keep_last_local=0)
    with pytest.raises(ValueError, match="compression"):
        CheckpointConfig(levels=("/tmp/x",), compression="lz4")
    with pytest.raises(ValueError, match="must be a local path"):
        CheckpointConfig(levels=("s3://bucket/x",))
    with pytest.raises(ValueError, match="tuple of URLs"):
        CheckpointConfig(levels="/tmp/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_host_buffers"):
        Checkpointer(CheckpointConfig(levels=("host://",), num_host_buffers=1))


def test_bad_save_arguments_are_rejected(tmp_path: Path) -> None:
    with _ckpt("host://") as ck:
        with pytest.raises(ValueError, match="step"):
            ck.save(-1, {})
        with pytest.raises(ValueError, match="levels"):
            ck.save(1, {}, levels=["local"])
        with pytest.raises(ValueError, match="JSON"):
            ck.save(1, {}, metadata={"x": object()})
    with NoCheckpointErrorContext():
        _ckpt(str(tmp_path / "empty")).restore()


class NoCheckpointErrorContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, value: Any, tb: Any) -> bool:
        assert typ is NoCheckpointError, typ
        return True


# ---- direct writes: the local level reads the live CPU tensors (staging="auto") ---------------


def test_direct_write_stages_what_the_writer_has_not_started_so_mutating_after_the_barrier_is_safe(
    tmp_path: Path,
) -> None:
    faults = FaultInjector()
    gate = threading.Event()
    faults.inject("local.open", gate=gate)  # the writer waits: every chunk is still unwritten
    state = make_state(3, scale=8)
    original = make_state(3, scale=8)
    with _ckpt(str(tmp_path / "l"), faults=faults) as ck:
        handle = ck.save(3, state)
        ck.wait_until_safe_to_mutate(timeout_s=30)  # copies the chunks into a host buffer
        for t in (state["model"]["w"], state["optim"]["state"][0]["exp_avg"]):
            t.add_(1.0)  # optimizer.step()
        gate.set()
        handle.wait("local", timeout_s=30)
        assert faults.fired("local.open") == 1
        assert ck._pool.num_allocations == 1  # the staged copy: the live tensors were not read
        assert_same(original, ck.restore())


def test_direct_write_barrier_waits_for_a_chunk_being_written_from_the_live_tensors(
    tmp_path: Path,
) -> None:
    faults = FaultInjector()
    gate = threading.Event()
    faults.inject("local.write", gate=gate, times=None)  # chunks stall mid-write
    state = make_state(4, scale=8)
    original = make_state(4, scale=8)
    with _ckpt(str(tmp_path / "l"), faults=faults) as ck:
        handle = ck.save(4, state)
        deadline = time.monotonic() + 30
        while faults.hits("local.write") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # a writer holds a chunk of the live tensors
        with pytest.raises(CheckpointTimeoutError):
            ck.wait_until_safe_to_mutate(timeout_s=0.3)
        gate.set()
        ck.wait_until_safe_to_mutate(timeout_s=30)
        state["model"]["w"].add_(1.0)
        handle.wait("local", timeout_s=30)
        assert faults.fired("local.write") >= 1
        assert_same(original, ck.restore())


def test_direct_write_that_fails_frees_its_staged_copy_and_the_next_save_succeeds(
    tmp_path: Path,
) -> None:
    faults = FaultInjector()
    gate = threading.Event()
    faults.inject("local.open", gate=gate, error=OSError(errno.EIO, "injected I/O error"))
    with _ckpt(str(tmp_path / "l"), faults=faults) as ck:
        handle = ck.save(1, make_state(1, scale=4))
        ck.wait_until_safe_to_mutate(timeout_s=30)  # stages every chunk
        gate.set()
        with pytest.raises(CheckpointWriteError, match="injected I/O error"):
            handle.wait("local", timeout_s=30)
        assert faults.fired("local.open") == 1
        for step in (2, 3, 4):  # the failed save's buffer went back to the pool
            ck.save(step, make_state(step, scale=4))
            ck.wait_until_safe_to_mutate(timeout_s=30)
        ck.wait(timeout_s=30)
        assert [i.step for i in ck.checkpoints()] == [3, 4]
        assert_same(make_state(4, scale=4), ck.restore())


def test_direct_write_then_wait_alone_does_not_hang_and_the_checkpoint_is_whole(
    tmp_path: Path,
) -> None:
    state = make_state(2, scale=4)
    with _ckpt(str(tmp_path / "l")) as ck:
        ck.save(2, state)
        ck.wait(timeout_s=30)
        assert_same(make_state(2, scale=4), ck.restore())
