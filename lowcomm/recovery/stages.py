"""A byte-level GPT cut into pipeline stages: the (de)embedding stage and N block stages.

The ring layout (docs/algorithms.md section 4): stage 0 embeds the input bytes and, at the end of
the pipeline, applies the final norm and the head and computes the loss; block stages 1..N hold
``layers_per_stage`` transformer blocks each, all of one shape, so any two block stages can be
averaged or copied into each other. The model is the same pre-norm transformer as
``lowcomm.launch``'s tiny GPT (recovery may not import launch, so the pieces are here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlockStage",
    "EmbeddingStage",
    "StageConfig",
    "TransformerBlock",
    "build_stages",
    "init_stage_",
]


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """The pipeline's shape. Parameters: about ``12 * width**2`` per layer."""

    num_block_stages: int = 8
    layers_per_stage: int = 1
    width: int = 64
    num_heads: int = 4
    context: int = 64
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name in (
            "num_block_stages",
            "layers_per_stage",
            "width",
            "num_heads",
            "context",
            "vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"StageConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(
                f"StageConfig.width ({self.width}) must be divisible by num_heads ({self.num_heads})"
            )

    @property
    def num_layers(self) -> int:
        return self.num_block_stages * self.layers_per_stage


class TransformerBlock(nn.Module):
    """A pre-norm transformer block (causal self-attention, then a 4x GELU MLP), with residuals.
    The tiny GPT (``lowcomm.launch.tinygpt``) is built of the same blocks."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        shape = (b, t, self.num_heads, c // self.num_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class BlockStage(nn.Module):
    """``layers_per_stage`` transformer blocks: activations in, activations out."""

    def __init__(self, config: StageConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(config.width, config.num_heads) for _ in range(config.layers_per_stage)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return h


class EmbeddingStage(nn.Module):
    """Stage 0: ``embed`` starts the pipeline, ``loss`` ends it (final norm, head, cross-entropy)."""

    def __init__(self, config: StageConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Embedding(config.context, config.width)
        self.ln = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))

    def loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.ln(h))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))


def init_stage_(stage: nn.Module, config: StageConfig, *, generator: torch.Generator) -> None:
    """GPT-2 style initialisation in place, drawn from ``generator`` (seeded, reproducible):
    matrices N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2 * num_layers)), biases
    zero, norms one. Also the random re-initialisation baseline's rebuild."""
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if p.dim() == 2:
                residual = name.endswith("out.weight") or name.endswith("proj.weight")
                std = 0.02 / math.sqrt(2 * config.num_layers) if residual else 0.02
                nn.init.normal_(p, std=std, generator=generator)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)


def build_stages(
    config: StageConfig, *, generator: torch.Generator
) -> tuple[EmbeddingStage, list[BlockStage]]:
    """Stage 0 and block stages 1..N, initialised from ``generator`` in stage order."""
    embedding = EmbeddingStage(config)
    init_stage_(embedding, config, generator=generator)
    blocks = []
    for _ in range(config.num_block_stages):
        stage = BlockStage(config)
        init_stage_(stage, config, generator=generator)
        blocks.append(stage)
    return embedding, blocks
