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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch

from lowcomm.diloco import DiLoCo, OuterConfig
from lowcomm.launch.tinygpt import GPT, GPTConfig, load_corpus, sample_batch
from lowcomm.testing.groups import LocalGroup

__all__ = [
    "LM_BETAS",
    "LM_WARMUP_STEPS",
    "LM_WEIGHT_DECAY",
    "Corpus",
    "LMAdamW",
    "RunResult",
    "build_gpt",
    "evaluate",
    "simulate",
]

# The usual language-model AdamW (DiLoCo, Chinchilla, nanoGPT): a short second-moment memory.
# torch's defaults (betas (0.9, 0.999), weight decay 0.01) adapt slowly, and with them outer
# Nesterov momentum 0.9 closes 11% of the one-worker/data-parallel gap instead of 62% (docs/
# outer_loop_defaults.md).
LM_BETAS = (0.9, 0.95)
LM_WEIGHT_DECAY = 0.1
# Linear warm-up of the inner learning rate (measured: docs/outer_loop_defaults.md).
LM_WARMUP_STEPS = 100


class LMAdamW(torch.optim.AdamW):
    """AdamW with the language-model settings and a linear learning-rate warm-up.

    Step t (from 1) uses ``lr * min(1, t / warmup_steps)`` (``warmup_steps=0``: no warm-up), where
    ``lr`` is each group's ``"lr"`` at that step: the warm-up only scales it for the step and
    restores it, so a schedule that sets ``"lr"``, or ``lowcomm.trainer``'s priming step at lr 0,
    works unchanged. The step count is kept in each parameter group (``"num_steps"``, not counted
    for a step at lr 0), so it travels with ``state_dict()`` and a resumed optimizer continues the
    ramp where it stopped.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        betas: tuple[float, float] = LM_BETAS,
        weight_decay: float = LM_WEIGHT_DECAY,
        warmup_steps: int = 0,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)
        for group in self.param_groups:
            group.update(warmup_steps=warmup_steps, num_steps=0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        peaks = [group["lr"] for group in self.param_groups]
        for group, peak in zip(self.param_groups, peaks, strict=True):
            if float(peak) != 0.0:
                group["num_steps"] += 1
            if group["warmup_steps"]:
                group["lr"] = peak * min(1.0, max(1, group["num_steps"]) / group["warmup_steps"])
        try:
            return super().step(closure)
        finally:
            for group, peak in zip(self.param_groups, peaks, strict=True):
                group["lr"] = peak


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


Init = Literal["torch", "gpt2"]


def build_gpt(gpt: GPTConfig, *, seed: int, init: Init = "torch") -> GPT:
    """The seeded GPT, with torch's default initialisation unless ``init="gpt2"``.

    ``"torch"`` redraws every layer as a plain script's model is drawn (embeddings N(0, 1),
    linear layers uniform in +-1/sqrt(fan_in)); ``"gpt2"`` keeps ``GPT``'s own (normal, std 0.02).
    At the calibration width the first learns much faster: one worker's validation loss after
    1200 steps is 1.69 against 1.89, and only with it does outer momentum 0.9 beat one worker
    (docs/outer_loop_defaults.md). The same seed gives the same model on every peer.
    """
    torch.manual_seed(seed)
    model = GPT(gpt)
    if init == "torch":
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if module is not model and callable(reset):
                reset()
    return model


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
    betas: tuple[float, float] = LM_BETAS,
    weight_decay: float = LM_WEIGHT_DECAY,
    warmup_steps: int = 0,
    init: Init = "torch",
) -> RunResult:
    """Trains and returns the validation loss of the final (outer) parameters.

    ``outer=None`` trains one model with batch ``num_replicas * batch_size`` (``num_replicas=1``:
    one worker; more: data-parallel). Otherwise ``num_replicas`` replicas run ``outer``.
    ``eval_every`` (a multiple of ``sync_every``) records ``(step, validation loss)`` of the
    model (of the outer parameters, for DiLoCo) in ``RunResult.curve``. Every model trains with
    ``LMAdamW(lr, betas, weight_decay, warmup_steps)``, from the initialisation ``init``
    (see ``build_gpt``).
    """

    def inner(model: GPT) -> LMAdamW:
        return LMAdamW(
            model.parameters(),
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
        )

    start = time.perf_counter()
    if outer is None:
        # One model; data-parallel's gradient of the concatenated batch is the mean of the
        # replicas' gradients, computed by replica copies in threads (as fast as DiLoCo's
        # replicas) and summed in a fixed order, so the run stays bit-reproducible.
        model = build_gpt(gpt, seed=seed, init=init)
        opt = inner(model)
        copies = [model] + [build_gpt(gpt, seed=seed, init=init) for _ in range(num_replicas - 1)]
        gens = [torch.Generator().manual_seed(seed * 1000 + r) for r in range(num_replicas)]
        curve: list[tuple[int, float]] = []
        params = [list(m.parameters()) for m in copies]

        def backward(r: int) -> None:
            x, y = sample_batch(
                corpus.train, batch_size=batch_size, context=gpt.context, generator=gens[r]
            )
            copies[r](x, y).backward()

        pool = ThreadPoolExecutor(num_replicas) if num_replicas > 1 else None
        for step in range(steps):
            if pool is None:
                backward(0)
            else:
                list(pool.map(backward, range(num_replicas)))
                with torch.no_grad():
                    for i, p in enumerate(params[0]):
                        assert p.grad is not None
                        for copy in params[1:]:
                            p.grad.add_(copy[i].grad)  # type: ignore[arg-type]
                        p.grad.div_(num_replicas)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if pool is not None:
                with torch.no_grad():
                    for copy in params[1:]:
                        for p, q in zip(params[0], copy, strict=True):
                            q.copy_(p)
                            q.grad = None
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                curve.append((step + 1, evaluate(model, corpus, num_batches=8)))
        if pool is not None:
            pool.shutdown()
        final = evaluate(model, corpus)
        curve.append((steps, final))
        return RunResult(name, final, time.perf_counter() - start, curve=curve)

    group = LocalGroup(num_replicas)
    models = [
        build_gpt(gpt, seed=seed, init=init) for _ in range(num_replicas)
    ]  # seeded here: global RNG
    probe = build_gpt(gpt, seed=seed, init=init)
    trainers: list[DiLoCo | None] = [None] * num_replicas
    errors: list[BaseException] = []
    curve = []

    def replica(rank: int) -> None:
        try:
            model = models[rank]
            opt = inner(model)
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
