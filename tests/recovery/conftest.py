"""One torch thread for the recovery tests: the tiny stages gain nothing from more, and on a shared
machine two threads per process oversubscribe the cores (a 12-step run went from 1 s to 9 s)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
