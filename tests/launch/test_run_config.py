"""The run configuration (run.toml): validated into frozen dataclasses, every error naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowcomm.launch.run_config import DEFAULT_TASK, load_run_config, parse_run_config

GOOD = """
task = "mypkg.task:build"
outer_steps = 100

[settings]
width = 64

[outer]
method = "diloco"
sync_every = 10
outer_lr = 0.5

[checkpoint]
remote = "file:///shared/run1"
every = 2
"""


def test_a_full_run_config_is_read_into_frozen_dataclasses() -> None:
    cfg = parse_run_config(GOOD, source="run.toml")
    assert cfg.task == "mypkg.task:build" and cfg.outer_steps == 100
    assert dict(cfg.settings) == {"width": 64}
    assert (cfg.outer.method, cfg.outer.sync_every, cfg.outer.outer_lr) == ("diloco", 10, 0.5)
    assert (cfg.checkpoint.remote, cfg.checkpoint.every) == ("file:///shared/run1", 2)
    assert cfg.text == GOOD  # what the master hands to joiners
    with pytest.raises(AttributeError):
        cfg.task = "other:build"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.settings["width"] = 1  # type: ignore[index]


def test_an_empty_config_is_the_tiny_gpt_run() -> None:
    cfg = parse_run_config(b"")
    assert cfg.task == DEFAULT_TASK and cfg.outer.method == "async"
    assert cfg.checkpoint.remote is None and cfg.outer_steps is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'task = "a.b:c"\n[outer]\nsync_every = 0',
            "run.toml: [outer].sync_every must be >= 1, got 0",
        ),
        ('task = "a.b:c"\n[outer]\nsync_evry = 5', "run.toml: [outer] has no field 'sync_evry'"),
        ('task = "a.b:c"\n[outer]\nsync_every = "5"', "run.toml: [outer].sync_every must be int"),
        ('task = "a.b:c"\n[outer]\nmethod = "adam"', "run.toml: [outer].method must be one of"),
        ('task = "a.b:c"\n[outer]\nouter_lr = -1.0', "run.toml: [outer].outer_lr must be finite"),
        ('task = "a.b:c"\n[checkpoint]\nevery = 0', "run.toml: [checkpoint].every must be >= 1"),
        (
            'task = "a.b:c"\n[checkpoint]\nremote = "/x"',
            "run.toml: [checkpoint].remote must be a URL",
        ),
        ('task = "a.b:c"\nouter_steps = 0', "run.toml: outer_steps must be an integer >= 1"),
        ('task = "a.b:c"\nsettings = 3', "run.toml: [settings] must be a table"),
        ('task = "a.b:c"\ntaks = 1', "run.toml: unknown key 'taks'"),
        ('task = "mypkg.task"', "run.toml: task must be 'package.module:function'"),
        ("[outer]\nsync_every = 5", "run.toml: task is missing"),
        ("task = ", "run.toml: not valid TOML"),
    ],
)
def test_a_malformed_run_config_is_rejected_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_run_config(text, source="run.toml")
    assert str(info.value).startswith(message), str(info.value)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such run configuration file"):
        load_run_config(tmp_path / "run.toml")
