"""The run configuration: a TOML file given to ``lowcomm master --config``, and what joiners get.

The master reads and validates it at start (``load_run_config``: every error names the file and the
field, ``run.toml: [outer].sync_every must be >= 1, got 0``) and hands its text to every joining
peer as the run's configuration blob; ``lowcomm join`` parses the same text with the same code
(``parse_run_config``). The schema::

    task = "lowcomm.launch.tasks:tinygpt"   # required: package.module:function (see launch.task)
    outer_steps = 1000                       # optional: volunteers stop at this outer step

    [settings]                               # the task's own table, handed to build(config)
    width = 128

    [outer]                                  # lowcomm.diloco.OuterConfig fields
    method = "async"
    sync_every = 20

    [checkpoint]                             # optional
    remote = "file:///shared/run1"           # the run's remote level: the outer state lives here,
                                             # so the run outlives its peers (any fsspec URL)
    every = 1                                # outer steps between saves of the outer state

The ``[settings]`` table is the task's business: the master checks only that it is a table; the
task validates it when a volunteer builds it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowcomm.diloco import OuterConfig

__all__ = [
    "DEFAULT_TASK",
    "RunCheckpoint",
    "RunConfig",
    "load_run_config",
    "parse_run_config",
]

DEFAULT_TASK = "lowcomm.launch.tasks:tinygpt"
# What a run started without --config trains: the demo's outer loop on the tiny GPT.
_DEFAULT_OUTER: dict[str, Any] = {"method": "async", "sync_every": 20}
_TOP_KEYS = ("task", "outer_steps", "settings", "outer", "checkpoint")
_ENTRY_POINT = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True, kw_only=True)
class RunCheckpoint:
    """The run's ``[checkpoint]`` table: where the peers keep the run's outer state.

    Attributes:
        remote: an fsspec URL (``file:///shared/run1``, ``s3://bucket/run1``) or None (the run's
            state lives only on its peers: when the last one leaves, the next starts afresh).
        every: outer steps between saves of the outer state (by the peer of rank 0).
    """

    remote: str | None = None
    every: int = 1

    def __post_init__(self) -> None:
        if self.remote is not None and (not isinstance(self.remote, str) or not self.remote):
            raise ValueError(f"remote must be a non-empty URL string, got {self.remote!r}")
        if self.remote is not None and "://" not in self.remote:
            raise ValueError(
                f"remote must be a URL such as 'file:///shared/run1' or 's3://bucket/run1', "
                f"got {self.remote!r}"
            )
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A validated run configuration (see the module docstring for the TOML schema).

    Attributes:
        task: the task's entry point, ``package.module:function``.
        settings: the task's own ``[settings]`` table (read-only).
        outer: the outer loop every peer runs.
        checkpoint: the run's remote level for its outer state.
        outer_steps: volunteers stop once the run reaches this outer step (None: never).
        text: the TOML text it was read from (what the master hands to joiners).
    """

    task: str = DEFAULT_TASK
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    outer: OuterConfig
    checkpoint: RunCheckpoint = field(default_factory=RunCheckpoint)
    outer_steps: int | None = None
    text: str = ""

    def describe(self) -> str:
        """One line for humans: the task, its settings and the outer loop."""
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items()) or "defaults"
        return (
            f"task {self.task} ({settings}); outer loop {self.outer.method}, "
            f"sync_every={self.outer.sync_every}"
        )


def load_run_config(path: str | Path) -> RunConfig:
    """Reads and validates a run configuration file.

    Raises:
        ValueError: the file is missing, unreadable, not TOML, or a field is wrong; the message
            starts with the file name and names the field.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{p}: no such run configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the run configuration: {exc}") from None
    return parse_run_config(text, source=p.name)


def parse_run_config(text: str | bytes, *, source: str = "the run configuration") -> RunConfig:
    """Validates TOML text into a ``RunConfig``; empty text is the default run (the tiny GPT).

    Raises:
        ValueError: ``"<source>: <field> <what is wrong>"``.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{source}: not UTF-8 text") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from None
    if not text.strip():
        raw = {}
    return _validate(raw, text, source)


def _validate(raw: dict[str, Any], text: str, source: str) -> RunConfig:
    from lowcomm.diloco import OuterConfig

    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(_TOP_KEYS)})")
    task = raw.get("task", DEFAULT_TASK if not raw else None)
    if task is None:
        raise ValueError(
            f'{source}: task is missing: name the entry point, e.g. task = "{DEFAULT_TASK}"'
        )
    if not isinstance(task, str) or not _ENTRY_POINT.match(task):
        raise ValueError(
            f"{source}: task must be 'package.module:function', got {task!r}"
            f" (e.g. {DEFAULT_TASK!r})"
        )
    outer_steps = raw.get("outer_steps")
    if outer_steps is not None and (
        isinstance(outer_steps, bool) or not isinstance(outer_steps, int) or outer_steps < 1
    ):
        raise ValueError(f"{source}: outer_steps must be an integer >= 1, got {outer_steps!r}")
    settings = _table(raw, "settings", source)
    outer_raw = _table(raw, "outer", source) if "outer" in raw else dict(_DEFAULT_OUTER)
    outer = _fill(OuterConfig, outer_raw, "outer", source)
    checkpoint = _fill(RunCheckpoint, _table(raw, "checkpoint", source), "checkpoint", source)
    return RunConfig(
        task=task,
        settings=MappingProxyType(dict(settings)),
        outer=outer,
        checkpoint=checkpoint,
        outer_steps=outer_steps,
        text=text,
    )


def _table(raw: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"{source}: [{name}] must be a table, got {value!r}")
    return value


def _fill(cls: Any, table: dict[str, Any], section: str, source: str) -> Any:
    """``cls(**table)`` with unknown keys, wrong types and the class's own errors named as
    ``[section].field``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in fields:
            raise ValueError(
                f"{source}: [{section}] has no field {key!r} (known: {', '.join(fields)})"
            )
        expected = _expected_type(fields[key])
        if expected is not None and not _is_instance(value, expected):
            raise ValueError(
                f"{source}: [{section}].{key} must be {expected.__name__}, got {value!r}"
            )
    try:
        return cls(**table)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        prefix = f"{cls.__name__}."
        msg = msg.replace(prefix, f"[{section}].") if prefix in msg else f"[{section}].{msg}"
        raise ValueError(f"{source}: {msg}") from None


def _expected_type(f: dataclasses.Field[Any]) -> type | None:
    """The plain type a field's default has (int, float, str, bool), if it has one."""
    default = f.default
    if default is dataclasses.MISSING or default is None:
        annotation = str(f.type)
        for name, typ in (("float", float), ("int", int), ("str", str), ("bool", bool)):
            if annotation.startswith(name):
                return typ
        return None
    return type(default) if type(default) in (int, float, str, bool) else None


def _is_instance(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)
