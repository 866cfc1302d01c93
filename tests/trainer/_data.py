"""A tiny deterministic, stateful data source for the trainer tests (as a StatefulDataLoader)."""

from __future__ import annotations

from typing import Any

import torch


class Batches:
    """Batch ``i`` is a function of ``seed`` and ``i`` alone; ``state_dict`` is the position."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.position)
        self.position += 1
        x = torch.randn(16, 8, generator=g)
        return x, x.sum(dim=1, keepdim=True) * 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.seed = int(state["seed"])


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def train_step(model: torch.nn.Module, data: Batches, trainer: Any) -> None:
    x, y = data.next()
    noise = torch.randn(1).item() * 1e-3  # draws from the global RNG, which a resume restores
    torch.nn.functional.mse_loss(model(x) + noise, y).backward()
    trainer.step()
