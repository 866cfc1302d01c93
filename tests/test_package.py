"""The package surface: one import root, the error base class, the subpackages."""

from __future__ import annotations

import importlib

import pytest

import lowcomm


@pytest.mark.parametrize(
    "name", ["comm", "compression", "diloco", "checkpoint", "recovery", "launch", "testing"]
)
def test_every_subpackage_imports_and_declares_its_public_names(name: str) -> None:
    module = importlib.import_module(f"lowcomm.{name}")
    assert isinstance(module.__all__, list)
    for public in module.__all__:
        assert hasattr(module, public), f"lowcomm.{name}.__all__ names missing {public}"


def test_lowcomm_error_is_a_runtime_error_users_can_catch() -> None:
    with pytest.raises(RuntimeError):
        raise lowcomm.LowcommError("peer 3 died")
