"""The on-disk format does not drift: old checkpoints restore, and the encoder writes the same bytes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from conftest import assert_same

from lowcomm.checkpoint import CheckpointConfig, Checkpointer
from lowcomm.checkpoint._format import (
    ChunkEntry,
    checksum_fn,
    decode_chunk,
    encode_chunk,
    load_manifest_bytes,
)

DATA = Path(__file__).parent / "data"
STEP_DIR = "step_000000000005"


def _fixture_state() -> dict[str, Any]:
    """The state the checkpoints in data/ hold (see data/README.md)."""
    return {
        "model": {
            "w": (torch.arange(1536, dtype=torch.float32) / 7).reshape(24, 64),
            "b": torch.linspace(-1, 1, 63).to(torch.bfloat16),
            "idx": torch.arange(40, dtype=torch.int64),
        },
        "optim": {"step": torch.tensor(5.0), "lr": 1e-3},
        "tuple": (5, "x", [1.5, None]),
    }


def _part(root: Path) -> dict[str, Any]:
    body = load_manifest_bytes((root / STEP_DIR / "MANIFEST.json").read_bytes())
    part: dict[str, Any] = body["ranks"][0]
    return part


@pytest.mark.parametrize("name", ["v1_shuffle_zstd_crc32c", "v1_zstd_crc32"])
def test_checkpoints_written_by_the_previous_format_code_still_restore(
    tmp_path: Path, name: str
) -> None:
    root = tmp_path / name
    shutil.copytree(DATA / name, root)
    with Checkpointer(CheckpointConfig(levels=(str(root),))) as ck:
        assert [i.step for i in ck.checkpoints()] == [5]
        assert_same(ck.restore(), _fixture_state())
        assert ck.last_restore is not None
        assert ck.last_restore.metadata == {"note": "written by lowcomm a5281ad"}


@pytest.mark.parametrize(
    ("name", "compression"), [("v1_shuffle_zstd_crc32c", "shuffle-zstd"), ("v1_zstd_crc32", "zstd")]
)
def test_every_chunk_of_an_old_checkpoint_re_encodes_to_the_same_stored_bytes(
    name: str, compression: str
) -> None:
    # Chunk by chunk, not file against file: the host buffer's padding between tensors is
    # uninitialized memory, so two saves of one state may differ there.
    part = _part(DATA / name)
    data = (DATA / name / STEP_DIR / part["data_file"]).read_bytes()
    check = checksum_fn(part["checksum"])
    chunks = [ChunkEntry.from_json(c) for c in part["chunks"]]
    assert {c.codec for c in chunks} == {compression}
    for c in chunks:
        stored = data[c.file_offset : c.file_offset + c.stored_len]
        assert check(stored) == c.crc32
        raw = bytes(decode_chunk(stored, c.codec, c.raw_len))
        again, codec = encode_chunk(memoryview(raw), compression, level=1)
        assert (bytes(again), codec) == (stored, c.codec)


def _reference_encode(raw: bytes, codec: str, level: int) -> tuple[bytes, str]:
    """The chunk encoder as it was written inline before (zstandard directly)."""
    payload: Any = raw
    if codec == "shuffle-zstd":
        if len(raw) % 4:
            codec = "zstd"
        else:
            arr = np.frombuffer(raw, dtype=np.uint8)
            payload = np.ascontiguousarray(arr.reshape(-1, 4).T).reshape(-1).data
    out = zstandard.ZstdCompressor(level=level).compress(payload)
    return (raw, "none") if len(out) >= len(raw) else (out, codec)


@pytest.mark.parametrize("codec", ["zstd", "shuffle-zstd"])
@pytest.mark.parametrize("level", [1, 3, 19])
@pytest.mark.parametrize("kind", ["floats", "odd_length", "random"])
def test_encode_chunk_is_byte_identical_to_the_plain_zstandard_reference(
    codec: str, level: int, kind: str
) -> None:
    g = torch.Generator().manual_seed(0)
    if kind == "random":
        raw = torch.randint(0, 256, (8192,), generator=g, dtype=torch.uint8).numpy().tobytes()
    else:
        raw = (torch.randn(4096, generator=g) * 1e-3).numpy().tobytes()
        if kind == "odd_length":
            raw = raw[:-3]
    stored, used = encode_chunk(memoryview(raw), codec, level=level)
    assert (bytes(stored), used) == _reference_encode(raw, codec, level)
    assert bytes(decode_chunk(stored, used, len(raw))) == raw
    if kind == "random":
        assert used == "none"  # incompressible: stored raw
    else:
        assert used == ("zstd" if kind == "odd_length" else codec)
