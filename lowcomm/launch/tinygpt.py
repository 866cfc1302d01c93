"""A tiny byte-level GPT and the embedded corpus the demo, tests and benchmarks train on.

The corpus is the text of the Python standard library's top-level modules, read from the running
interpreter's installation, so nothing is downloaded. Everything here is seeded and CPU-friendly.
"""

from __future__ import annotations

import glob
import math
import os
import sysconfig
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowcomm.recovery.stages import TransformerBlock

__all__ = ["GPT", "GPTConfig", "load_corpus", "sample_batch"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of the tiny GPT. The defaults are the 0.47M-parameter calibration model."""

    num_layers: int = 2
    width: int = 128
    num_heads: int = 4
    context: int = 64
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name in ("num_layers", "width", "num_heads", "context", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(
                f"GPTConfig.width ({self.width}) must be divisible by num_heads ({self.num_heads})"
            )


class GPT(nn.Module):
    """A pre-norm decoder-only transformer over bytes; ``forward(x, y)`` returns the mean loss."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.width, config.num_heads) for _ in range(config.num_layers)
        )
        self.ln = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * config.num_layers) if name.endswith("out.weight") else 0.02
                )
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.ln(h))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))


def load_corpus(*, max_bytes: int | None = None) -> torch.Tensor:
    """The standard library's top-level ``*.py`` files, concatenated in name order, as uint8 bytes.

    Deterministic for a given Python installation. ``max_bytes`` truncates (for quick runs).
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if not files:
        raise FileNotFoundError(f"no Python sources found under {stdlib} for the embedded corpus")
    chunks: list[bytes] = []
    total = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)
    if max_bytes is not None:
        blob = blob[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def sample_batch(
    data: torch.Tensor, *, batch_size: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of (input, target) byte windows; deterministic given ``generator``."""
    if data.numel() <= context + 1:
        raise ValueError(f"corpus of {data.numel()} bytes is shorter than context {context} + 1")
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]
