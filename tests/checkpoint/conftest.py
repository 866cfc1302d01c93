"""Fixtures for the checkpoint tests: deterministic training-like state and a real local S3 server."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch


def make_state(step: int, *, scale: int = 1) -> dict[str, Any]:
    """A model + AdamW-like state whose every value depends on ``step`` (bit-exact comparisons)."""
    g = torch.Generator().manual_seed(1000 + step)
    n = 256 * scale
    return {
        "model": {
            "w": torch.randn(n, 64, generator=g),
            "b": torch.randn(64, generator=g).to(torch.bfloat16),
            "emb": torch.randint(0, 1000, (n,), generator=g, dtype=torch.int64),
        },
        "optim": {
            "state": {
                0: {"exp_avg": torch.randn(n, 64, generator=g), "step": torch.tensor(float(step))}
            },
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        "rng": torch.Generator().manual_seed(step).get_state(),
        "mask": torch.rand(33, generator=g) > 0.5,
        "empty": torch.empty(0, 3),
        "data_position": {"epoch": step // 10, "offset": step * 7},
        "tuple": (step, "x", [1.5, None]),
    }


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of nested states (tensors compared as raw bytes, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if a.numel():
            raw_a = a.contiguous().reshape(-1).view(torch.uint8)
            assert raw_a.equal(b.contiguous().reshape(-1).view(torch.uint8)), path
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
        return
    if isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}")
        return
    assert a == b, path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1; yields s3fs options."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "eu-west-1"},
        "skip_instance_cache": True,
    }
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("lowcomm-ckpt")
    yield options
    server.stop()
