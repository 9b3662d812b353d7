"""The example in tests/examples fails without the guard and passes with it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "test_mission_critical.py"
FIX = '    emitguard_guard(emitguard_manager, disconnect="disconnect_user")  # the one-line fix\n'
ASYNCIO = (
    "-p",
    "asyncio",
    "-o",
    "asyncio_mode=auto",
    "-o",
    "asyncio_default_fixture_loop_scope=function",
)


def test_the_example_passes_guarded(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_copied_example=EXAMPLE.read_text(encoding="utf-8"))
    pytester.runpytest(*ASYNCIO).assert_outcomes(passed=1)


def test_the_example_fails_unguarded_with_the_report(pytester: pytest.Pytester) -> None:
    source = EXAMPLE.read_text(encoding="utf-8")
    assert FIX in source
    pytester.makepyfile(test_copied_example=source.replace(FIX, "    del emitguard_guard\n"))
    result = pytester.runpytest(*ASYNCIO)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*not delivered to thread thread-1: agent_started*"])
