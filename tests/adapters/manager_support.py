"""Fixtures for the manager adapter tests: guarding that always unguards, a record
listener, and real module files for dotted-path targets.

A plain module with a unique name, loaded by the test modules with
``pytest_plugins = ["manager_support"]``: a ``tests/adapters/conftest.py`` would replace
``tests/conftest.py`` as the ``conftest`` module that other test modules import from.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import emitguard
from emitguard import Emission, Guard, Outcome

GuardTarget = Callable[..., Guard]
"""The type of the :func:`guard_target` fixture."""


class Recorder:
    """A listener that keeps every emission record, in order."""

    def __init__(self) -> None:
        self.emissions: list[Emission] = []

    @emitguard.hookimpl
    def emitguard_emission(self, emission: Emission, guard: Guard) -> None:
        self.emissions.append(emission)

    def outcomes(self) -> list[Outcome]:
        return [emission.outcome for emission in self.emissions]

    def of(self, outcome: Outcome) -> list[Emission]:
        return [emission for emission in self.emissions if emission.outcome is outcome]

    def types(self, outcome: Outcome) -> list[str | None]:
        return [emission.event_type for emission in self.of(outcome)]


@pytest.fixture
def recorded() -> Iterator[Recorder]:
    """Every emission record made while the test runs."""
    recorder = Recorder()
    emitguard.register(recorder)
    try:
        yield recorder
    finally:
        emitguard.unregister(recorder)


@pytest.fixture
def guard_target(emitguard_guard: GuardTarget) -> GuardTarget:
    """``emitguard.guard`` that unguards every target it guarded when the test ends (the
    pytest plugin's ``emitguard_guard``, under the name these tests use)."""
    return emitguard_guard


@pytest.fixture
def make_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write ``<unique package>/legacy.py`` with the given source; return its dotted name.

    The module is not imported. Every module of the package is removed from
    ``sys.modules`` when the test ends.
    """
    packages: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(source: str) -> str:
        package = f"eg_legacy_{uuid.uuid4().hex}"
        folder = tmp_path / package
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / "legacy.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        packages.append(package)
        return f"{package}.legacy"

    try:
        yield make
    finally:
        for package in packages:
            for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
                del sys.modules[name]
