"""Helpers shared by the diloco tests: a toy problem whose trajectory can be worked out by hand."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowcomm.diloco import DiLoCo, OuterComm, OuterConfig
from lowcomm.errors import LowcommError


class Toy(nn.Module):
    """``num`` scalar parameters starting at 0; the tests set their gradients directly."""

    def __init__(self, num: int = 1) -> None:
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in range(num))


def toy_trainer(
    comm: OuterComm, config: OuterConfig, *, num: int = 1, **kwargs: Any
) -> tuple[Toy, DiLoCo]:
    model = Toy(num)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, DiLoCo(model, opt, comm, config=config, **kwargs)


def toy_step(model: Toy, trainer: DiLoCo, grad: float) -> None:
    for p in model.ps:
        p.grad = torch.full_like(p, grad)
    trainer.step()


def run_threads(fns: list[Callable[[], None]], *, timeout_s: float = 60) -> None:
    """Runs one callable per simulated peer in its own thread; re-raises the first failure."""
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def inner() -> None:
            try:
                fn()
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        return inner

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a simulated peer hung"
    if errors:
        raise errors[0]


class InjectedFailure(LowcommError):
    """The fault the failing communicator injects."""


class FailingComm:
    """Wraps a communicator; the all-reduces numbered in ``fail`` (0-based, data tag only) fail.

    ``fired`` counts the injected failures so a test can assert the fault really happened.
    """

    def __init__(self, inner: Any, *, fail: set[int], tag: int = 1) -> None:
        self.inner = inner
        self.fail = fail
        self.tag = tag
        self.calls = 0
        self.fired = 0

    @property
    def world_size(self) -> int:
        return int(self.inner.world_size)

    def all_reduce_async(self, tensor: torch.Tensor, op: str = "avg", **kw: Any) -> Any:
        if kw.get("tag") != self.tag:
            return self.inner.all_reduce_async(tensor, op, **kw)
        n = self.calls
        self.calls += 1
        if n in self.fail:
            outer = self

            class _Fails:
                def wait(self, *, timeout_s: float | None = None) -> Any:
                    outer.fired += 1
                    raise InjectedFailure(f"injected failure of all-reduce #{n}")

            return _Fails()
        return self.inner.all_reduce_async(tensor, op, **kw)

    def sync_shared_state(self, state: Any, strategy: str = "enforce_popular", **kw: Any) -> Any:
        return self.inner.sync_shared_state(state, strategy, **kw)

    def are_peers_pending(self, **kw: Any) -> bool:
        return bool(self.inner.are_peers_pending(**kw))

    def update_topology(self, **kw: Any) -> Any:
        return self.inner.update_topology(**kw)
