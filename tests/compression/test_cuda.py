"""The codecs on CUDA tensors: same results as on CPU, device round trips, error feedback."""

from __future__ import annotations

import pytest
import torch

from lowcomm.compression import Encoded, ErrorFeedback, get_codec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIGS = [
    ("fp16", {}),
    ("bf16", {}),
    ("uint8", {}),
    ("uint8", {"block_size": 1000}),
    ("int8", {}),
    ("fp8", {}),
    ("fp8", {"block_size": 100}),
    ("fp4", {}),
    ("fp4", {"variant": "e3m0", "block_size": 20}),
    ("topk", {"chunk_size": 1000, "k": 10, "value_bits": 4}),
]


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=[f"{n}{k}" for n, k in CONFIGS])
def test_cuda_encode_decode_matches_cpu_bit_for_bit(name: str, kwargs: dict[str, object]) -> None:
    x = torch.randn(257, 129, generator=torch.Generator().manual_seed(0)) * 2 + 0.25
    codec = get_codec(name, **kwargs)
    cpu = codec.decode(codec.encode(x))
    enc = codec.encode(x.cuda())
    assert enc.device.type == "cuda"
    gpu = codec.decode(enc)
    assert gpu.device.type == "cuda" and gpu.shape == x.shape
    assert torch.equal(gpu.cpu(), cpu), f"max diff {(gpu.cpu() - cpu).abs().max().item()}"


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=[f"{n}{k}" for n, k in CONFIGS])
def test_cuda_payload_travels_as_bytes_and_decodes_on_either_device(
    name: str, kwargs: dict[str, object]
) -> None:
    x = torch.randn(10_001, device="cuda")
    codec = get_codec(name, **kwargs)
    enc = codec.encode(x)
    back = Encoded.from_bytes(enc.to_bytes())
    on_gpu = codec.decode(back, device="cuda")
    out = torch.empty(10_001, device="cuda")
    codec.decode(back, out=out)
    assert torch.equal(on_gpu, out)
    assert torch.equal(codec.decode(back).cpu(), on_gpu.cpu())
    assert torch.equal(on_gpu, codec.decode(enc))


def test_cuda_nan_is_rejected() -> None:
    x = torch.randn(1000, device="cuda")
    x[10] = float("nan")
    for name in ("uint8", "int8", "fp8", "fp4", "fp16", "topk"):
        with pytest.raises(ValueError, match="NaN or inf"):
            get_codec(name).encode(x)


def test_cuda_error_feedback_sum_converges() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    ef = ErrorFeedback(get_codec("topk", chunk_size=1024, k=32))
    signal = torch.randn(16384, device="cuda", generator=g)
    sent = torch.zeros(16384, device="cuda")
    true = torch.zeros(16384, device="cuda")
    for _ in range(150):
        x = signal + 0.5 * torch.randn(16384, device="cuda", generator=g)
        true += x
        sent += ef.decode(ef.encode("w", x))
    assert ((sent - true).norm() / true.norm()).item() < 0.15
