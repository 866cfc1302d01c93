"""Quantized pseudo-gradients through lowcomm.compression, on a least-squares problem, 4 peers."""

from __future__ import annotations

import pytest
import torch

from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.testing.groups import LocalGroup

from ._toy import run_threads


def _train(quantization: str, *, rounds: int = 15) -> tuple[float, list[DiLoCo]]:
    torch.manual_seed(0)
    w_true = torch.randn(64, 8)
    group = LocalGroup(4)
    models = [torch.nn.Linear(64, 8, bias=False) for _ in range(4)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    trainers: list[DiLoCo] = []
    config = OuterConfig(sync_every=5, quantization=quantization, topk_fraction=0.1)

    def peer(rank: int) -> None:
        gen = torch.Generator().manual_seed(rank)
        opt = torch.optim.AdamW(models[rank].parameters(), lr=1e-2)
        trainer = DiLoCo(models[rank], opt, group.communicator(rank), config=config)
        trainers.append(trainer)
        for _ in range(rounds * 5):
            x = torch.randn(32, 64, generator=gen)
            torch.nn.functional.mse_loss(models[rank](x), x @ w_true).backward()
            trainer.step()
        trainer.finish()

    run_threads([lambda r=r: peer(r) for r in range(4)])  # type: ignore[misc]
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        loss = float(torch.nn.functional.mse_loss(models[0](x), x @ w_true))
    return loss, trainers


def test_uint8_pseudogradients_keep_peers_identical_and_track_fp32() -> None:
    fp32, _ = _train("none")
    uint8, trainers = _train("uint8")
    assert len({t.outer_hash() for t in trainers}) == 1
    sent = trainers[0].stats.tx_bytes
    assert uint8 <= 1.05 * fp32
    assert sent > 0


@pytest.mark.parametrize("codec", ["fp4", "topk"])
def test_lossy_codecs_still_train_the_replicas(codec: str) -> None:
    start, _ = _train("none", rounds=0)
    fp32, _ = _train("none")
    lossy, trainers = _train(codec)
    assert len({t.outer_hash() for t in trainers}) == 1
    # Far below where training started; within a few times of fp32 at this tiny scale.
    assert lossy < 0.5 * start
    assert lossy < 3 * fp32


def test_uint8_sends_about_a_quarter_of_fp32_bytes() -> None:
    _, fp32 = _train("none", rounds=2)
    _, uint8 = _train("uint8", rounds=2)
    ratio = uint8[0].stats.tx_bytes / fp32[0].stats.tx_bytes
    assert 0.2 < ratio < 0.35
