"""The task contract: what a run trains, as a function a volunteer has installed.

A run configuration names a task entry point, ``task = "package.module:function"``. The function
takes a ``TaskConfig`` and returns a ``Task``::

    def build(config: lowcomm.launch.task.TaskConfig) -> lowcomm.launch.task.Task:
        model = MyModel(**config.settings)
        return Task(
            model=model,
            inner_optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4),
            data=MyBatches(seed=config.seed),   # an iterator of batches; state_dict() optional
            loss=lambda model, batch: model(*batch),
            tokens_per_batch=16 * 64,
        )

Every peer of the run builds the same model (the outer state it receives overwrites the weights);
``config.seed`` differs per volunteer so that they read different data. If ``data`` has
``state_dict()``/``load_state_dict()`` its position is checkpointed with the volunteer.

Who chooses the code: the volunteer. ``resolve_task`` imports the entry point by name from the
volunteer's own installed packages and ``sys.path`` (``pkgutil.resolve_name``), never from bytes a
master sent; ``lowcomm join`` refuses a run whose task is not the one the volunteer named.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

__all__ = ["Task", "TaskConfig", "build_task", "resolve_task"]


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What a task's build function gets.

    Attributes:
        settings: the run configuration's ``[settings]`` table (read-only); the task validates it.
        seed: this volunteer's data seed (differs between volunteers).
    """

    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class Task:
    """What a volunteer trains.

    Attributes:
        model: the model (every peer builds the same architecture).
        inner_optimizer: the inner optimizer's factory, called with the model's parameters.
        data: an iterator of batches, endless or not (training stops when it ends); with
            ``state_dict()``/``load_state_dict()`` its position is checkpointed and resumed.
        loss: ``loss(model, batch)`` -> a scalar tensor to call ``backward()`` on.
        tokens_per_batch: tokens (or samples) in one batch, for the progress bar's rate.
    """

    model: nn.Module
    inner_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    data: Iterator[Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    tokens_per_batch: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"Task.model must be a torch.nn.Module, got {type(self.model)}")
        for name in ("inner_optimizer", "loss"):
            if not callable(getattr(self, name)):
                raise ValueError(f"Task.{name} must be callable")
        if not hasattr(self.data, "__next__"):
            raise ValueError(
                f"Task.data must be an iterator of batches (iter(...) it), got {type(self.data)}"
            )


def resolve_task(entry: str) -> Callable[[TaskConfig], Task]:
    """The build function ``entry`` (``package.module:function``) names, imported from this
    process's own packages and ``sys.path``.

    Raises:
        ValueError: the name is malformed, its module is not installed, or it is not callable;
            the message says how to fix it.
    """
    if ":" not in entry:
        raise ValueError(f"task {entry!r} must be 'package.module:function'")
    try:
        # pkgutil.resolve_name: the standard library's reader of "module:attribute" names (the
        # format of console-script entry points); it imports from sys.path only.
        fn = pkgutil.resolve_name(entry)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"cannot import task {entry!r}: {exc}; install the package that provides it "
            "(pip install ...) or add its directory to PYTHONPATH"
        ) from None
    except (AttributeError, ValueError, ImportError) as exc:
        raise ValueError(f"cannot load task {entry!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"task {entry!r} is not a function (got {type(fn).__name__})")
    return fn  # type: ignore[no-any-return,unused-ignore]


def build_task(entry: str, config: TaskConfig) -> Task:
    """Resolves ``entry`` and calls it; ValueError if it fails on its settings or returns no Task."""
    fn = resolve_task(entry)
    try:
        task = fn(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"task {entry!r} rejected its settings: {exc}") from None
    if not isinstance(task, Task):
        raise ValueError(
            f"task {entry!r} returned {type(task).__name__}, not a lowcomm.launch.task.Task"
        )
    return task
