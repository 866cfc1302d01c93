from __future__ import annotations

import pytest
import torch


def _student_t(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Student-t(3) = N(0,1) / sqrt(chi2_3 / 3), chi2_3 = sum of three squared normals.
    z = torch.randn(n, generator=g)
    chi2 = torch.randn(3, n, generator=g).pow(2).sum(0)
    return z / torch.sqrt(chi2 / 3)


@pytest.fixture(scope="session")
def gauss_2048() -> torch.Tensor:
    return torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def student_2048() -> torch.Tensor:
    return _student_t(2048 * 2048, seed=1).view(2048, 2048)
