"""``lowcomm checkpoint list|verify|export``: in-process through ``cli.main``, errors one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import assert_same, make_state

from lowcomm.checkpoint import CheckpointConfig, Checkpointer
from lowcomm.launch.cli import main


@pytest.fixture
def level(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    with Checkpointer(CheckpointConfig(levels=(str(root),), chunk_bytes=4096)) as ck:
        for step in (3, 6):
            ck.save(step, make_state(step), metadata={"inner_step": step})
    return root


def test_list_names_every_committed_step_with_its_metadata(
    level: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["checkpoint", "list", str(level)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["step 3", "step 6"]
    assert "1 rank(s)" in out[0] and "'inner_step': 6" in out[1]


def test_verify_passes_then_names_the_damaged_chunk_in_one_line(
    level: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["checkpoint", "verify", str(level)]) == 0
    assert capsys.readouterr().out.count(": ok") == 2
    data = level / "step_000000000006" / "rank_00000.data"
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main(["checkpoint", "verify", str(level), "--step", "6"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "step 6 rank 0" in err and "checksum mismatch" in err


def test_export_writes_a_torch_file_and_a_dcp_directory_equal_to_the_saved_state(
    level: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.pt"
    assert main(["checkpoint", "export", str(level), str(out), "--key", "model"]) == 0
    assert_same(torch.load(out), make_state(6)["model"])
    dcp_dir = tmp_path / "dcp"
    assert main(["checkpoint", "export", str(level), str(dcp_dir), "--step", "3", "--key",
                 "model", "--format", "dcp"]) == 0  # fmt: skip
    import torch.distributed.checkpoint as dcp

    expected = make_state(3)["model"]
    loaded = {k: torch.empty_like(v) for k, v in expected.items()}
    dcp.load(loaded, checkpoint_id=str(dcp_dir), no_dist=True)
    assert_same(loaded, expected)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["list", "{missing}"], "not a directory"),
        (["export", "{level}", "x.pt", "--step", "4"], "no committed step 4"),
        (["export", "{level}", "x.pt", "--key", "nope"], "no 'nope' here"),
        (["verify", "{level}", "--storage-option", "novalue"], "KEY=VALUE"),
    ],
)
def test_errors_are_one_line_naming_the_problem(
    level: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    os.chdir(tmp_path)
    args = [a.format(level=level, missing=tmp_path / "nowhere") for a in argv]
    assert main(["checkpoint", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
