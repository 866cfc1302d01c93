"""The tasks shipped with lowcomm: ``lowcomm.launch.tasks:tinygpt``, the demo's tiny GPT.

``[settings]`` of a run that trains it (every key optional)::

    num_layers = 2      width = 128     num_heads = 4     context = 64
    batch_size = 16     lr = 2e-3       corpus_bytes = 0  (0: the whole embedded corpus)
    warmup_steps = 100  (the inner AdamW's linear warm-up; betas (0.9, 0.95), weight decay 0.1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lowcomm.launch.experiments import LM_WARMUP_STEPS, Corpus, LMAdamW, build_gpt
from lowcomm.launch.task import Task, TaskConfig
from lowcomm.launch.tinygpt import GPTConfig, sample_batch

__all__ = ["ByteBatches", "TinyGPTSettings", "tinygpt"]


@dataclass(frozen=True, kw_only=True)
class TinyGPTSettings:
    """The tiny GPT task's settings (the run configuration's ``[settings]`` table)."""

    num_layers: int = 2
    width: int = 128
    num_heads: int = 4
    context: int = 64
    batch_size: int = 16
    lr: float = 2e-3
    corpus_bytes: int = 0
    warmup_steps: int = LM_WARMUP_STEPS

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"[settings].{f.name} must be a number, got {value!r}")
        if self.warmup_steps < 0 or isinstance(self.warmup_steps, float):
            raise ValueError(
                f"[settings].warmup_steps must be an integer >= 0, got {self.warmup_steps}"
            )
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                raise ValueError(f"[settings].{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"[settings].lr must be > 0, got {self.lr}")
        if self.corpus_bytes < 0:
            raise ValueError(f"[settings].corpus_bytes must be >= 0, got {self.corpus_bytes}")

    def gpt(self) -> GPTConfig:
        try:
            return GPTConfig(
                num_layers=self.num_layers,
                width=self.width,
                num_heads=self.num_heads,
                context=self.context,
            )
        except ValueError as exc:
            raise ValueError(str(exc).replace("GPTConfig.", "[settings].")) from None


class ByteBatches:
    """Endless seeded random batches of byte windows; its position is its generator's state."""

    def __init__(self, data: torch.Tensor, *, batch_size: int, context: int, seed: int) -> None:
        self.data, self.batch_size, self.context = data, batch_size, context
        self.generator = torch.Generator().manual_seed(seed)
        self.num_batches = 0

    def __iter__(self) -> ByteBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.num_batches += 1
        return sample_batch(
            self.data, batch_size=self.batch_size, context=self.context, generator=self.generator
        )

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "num_batches": self.num_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.num_batches = int(state["num_batches"])


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model(x, y)


def tinygpt(config: TaskConfig) -> Task:
    """The tiny byte-level GPT on the embedded corpus (the standard library's text)."""
    unknown = sorted(set(config.settings) - {f.name for f in dataclasses.fields(TinyGPTSettings)})
    if unknown:
        raise ValueError(f"[settings] has no field {unknown[0]!r} for the tinygpt task")
    settings = TinyGPTSettings(**config.settings)
    gpt = settings.gpt()
    corpus = Corpus.load(max_bytes=settings.corpus_bytes or None)
    lr, warmup = settings.lr, settings.warmup_steps
    return Task(
        # The same initial weights on every peer (the outer state overrides them anyway).
        model=build_gpt(gpt, seed=0),
        inner_optimizer=lambda params: LMAdamW(params, lr=lr, warmup_steps=warmup),
        data=ByteBatches(
            corpus.train, batch_size=settings.batch_size, context=gpt.context, seed=config.seed
        ),
        loss=_loss,
        tokens_per_batch=settings.batch_size * gpt.context,
    )
