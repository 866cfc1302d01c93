"""Seeded in-process training runs shared by the demo, the benchmark and the convergence test.

``simulate`` trains ``num_replicas`` replicas of the tiny GPT, one thread each, through the real
``lowcomm.diloco.DiLoCo`` wrapper over a ``LocalGroup`` (the same outer-loop code real peers run),
or a single model (one worker, or data-parallel with the replicas' batches concatenated, which is
what a synchronous all-reduce of gradients computes). Everything is seeded: data order depends
only on ``seed`` and the replica index.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.launch.tinygpt import GPT, GPTConfig, load_corpus, sample_batch
from lowcomm.testing.groups import LocalGroup

__all__ = ["Corpus", "RunResult", "evaluate", "simulate"]


@dataclass(frozen=True)
class Corpus:
    """The embedded corpus split 90/10 into training and validation bytes."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def load(cls, *, max_bytes: int | None = None) -> Corpus:
        data = load_corpus(max_bytes=max_bytes)
        cut = int(data.numel() * 0.9)
        return cls(train=data[:cut], val=data[cut:])


@dataclass
class RunResult:
    name: str
    val_loss: float
    seconds: float
    tx_bytes_per_peer: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (inner step, val loss)


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, *, num_batches: int = 16, batch_size: int = 64) -> float:
    """Mean loss over fixed validation batches (the same for every run)."""
    gen = torch.Generator().manual_seed(1234)
    device = next(model.parameters()).device
    total = 0.0
    for _ in range(num_batches):
        x, y = sample_batch(
            corpus.val, batch_size=batch_size, context=model.config.context, generator=gen
        )
        total += float(model(x.to(device), y.to(device)))
    return total / num_batches


def _model(gpt: GPTConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(gpt)


def simulate(
    name: str,
    *,
    corpus: Corpus,
    gpt: GPTConfig,
    steps: int,
    batch_size: int,
    lr: float,
    num_replicas: int,
    outer: OuterConfig | None,
    seed: int = 0,
    eval_every: int = 0,
) -> RunResult:
    """Trains and returns the validation loss of the final (outer) parameters.

    ``outer=None`` trains one model with batch ``num_replicas * batch_size`` (``num_replicas=1``:
    one worker; more: data-parallel). Otherwise ``num_replicas`` replicas run ``outer``.
    ``eval_every`` (a multiple of ``sync_every``) records ``(step, validation loss)`` of the
    model (of the outer parameters, for DiLoCo) in ``RunResult.curve``.
    """
    start = time.perf_counter()
    if outer is None:
        model = _model(gpt, seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        gens = [torch.Generator().manual_seed(seed * 1000 + r) for r in range(num_replicas)]
        curve: list[tuple[int, float]] = []
        for step in range(steps):
            xs, ys = zip(
                *(
                    sample_batch(
                        corpus.train, batch_size=batch_size, context=gpt.context, generator=g
                    )
                    for g in gens
                ),
                strict=True,
            )
            loss = model(torch.cat(xs), torch.cat(ys))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                curve.append((step + 1, evaluate(model, corpus, num_batches=8)))
        final = evaluate(model, corpus)
        curve.append((steps, final))
        return RunResult(name, final, time.perf_counter() - start, curve=curve)

    group = LocalGroup(num_replicas)
    models = [_model(gpt, seed) for _ in range(num_replicas)]  # seeded here: global RNG
    probe = _model(gpt, seed)
    trainers: list[DiLoCo | None] = [None] * num_replicas
    errors: list[BaseException] = []
    curve = []

    def replica(rank: int) -> None:
        try:
            model = models[rank]
            opt = torch.optim.AdamW(model.parameters(), lr=lr)
            trainer = DiLoCo(model, opt, group.communicator(rank), config=outer)
            trainers[rank] = trainer
            gen = torch.Generator().manual_seed(seed * 1000 + rank)
            for step in range(steps):
                x, y = sample_batch(
                    corpus.train, batch_size=batch_size, context=gpt.context, generator=gen
                )
                loss = model(x, y)
                loss.backward()
                trainer.step()
                if rank == 0 and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                    trainer.copy_outer_to(probe)
                    curve.append((step + 1, evaluate(probe, corpus, num_batches=8)))
            trainer.finish()
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    threads = [
        threading.Thread(target=replica, args=(r,), daemon=True) for r in range(num_replicas)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    first = trainers[0]
    assert first is not None
    for other in trainers[1:]:
        assert other is not None and torch.equal(other.outer_params, first.outer_params), (
            "replicas' outer parameters diverged"
        )
    final = evaluate(models[0], corpus)
    curve.append((steps, final))
    return RunResult(
        name,
        final,
        time.perf_counter() - start,
        tx_bytes_per_peer=first.stats.tx_bytes,
        curve=curve,
    )
