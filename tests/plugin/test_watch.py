"""The log watch and the emission report (pytest_emitguard._watch), in real pytest sessions."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest

pytest_plugins = ["pytester"]

ASYNCIO = ("-p", "asyncio", "-o", "asyncio_default_fixture_loop_scope=function")

SUITE = """
import asyncio
import logging

import emitguard
from emitguard.testing import ReferenceManager


async def test_lost_event():
    manager = ReferenceManager()
    await manager.send_to_thread("t-1", {"type": "agent_started"})  # no connection: logged


async def test_delivered():
    manager = ReferenceManager()
    guard = emitguard.guard(manager)
    try:
        manager.connect("u1")
        manager.update_connection_thread("u1", "t-2")
        await manager.send_to_thread("t-2", {"type": "agent_started"})
        await manager.send_to_thread("t-2", {"type": "agent_completed"})
    finally:
        emitguard.unguard(manager)


async def test_dropped():
    manager = ReferenceManager()
    guard = emitguard.guard(manager, on_unready="buffer", max_per_thread=1)
    try:
        manager.connect("u1")
        await manager.send_to_thread("t-3", {"type": "agent_started"})
        await manager.send_to_thread("t-3", {"type": "agent_thinking"})
    finally:
        emitguard.unguard(manager)
"""


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_suite=source)
    return pytester.runpytest(*ASYNCIO, "-o", "asyncio_mode=auto", *args)


# ----------------------------------------------------------------------------- log watch

LEGACY_PATTERNS = "[pytest]\nemitguard_fail_on_log =\n    Cannot deliver message for thread\n"

UNRELATED = """
import logging

log = logging.getLogger("billing")


def test_invoice():
    log.error("EMISSION FAILED for invoice 42")
    log.warning("Cannot deliver message for thread t-1 - no connections")
"""


def test_an_unrelated_project_logging_the_phrases_passes(pytester: pytest.Pytester) -> None:
    """emitguard is installed in the same environment, but this project never opted in."""
    result = run(pytester, UNRELATED)
    result.assert_outcomes(passed=1)
    assert "emitguard_fail_on_log" not in result.stdout.str()


def test_a_project_that_opts_in_fails_on_the_phrases(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        emitguard_fail_on_log = ["EMISSION FAILED", "Cannot deliver message for thread"]
        """
    )
    result = run(pytester, UNRELATED)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "emitguard: 2 log records match emitguard_fail_on_log",
            "- ERROR billing: EMISSION FAILED for invoice 42",
            "- WARNING billing: Cannot deliver message for thread t-1 - no connections",
            "",
            "set emitguard_fail_on_log to an empty value to turn this off",
        ]
    )


def test_legacy_warning_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(LEGACY_PATTERNS)
    result = run(
        pytester,
        """
from emitguard.testing import ReferenceManager


async def test_lost():
    manager = ReferenceManager()
    manager.connect("u1")
    await manager.send_to_thread("t-1", {"type": "agent_started"})
    await manager.send_to_thread("t-1", {"type": "agent_thinking"})
""",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "emitguard: 2 log records match emitguard_fail_on_log",
            "- WARNING emitguard.testing.legacy: Cannot deliver message for thread t-1"
            " - no connections (active connections: 1)",
            "- WARNING emitguard.testing.legacy: Cannot deliver message for thread t-1 - *",
            "",
            "set emitguard_fail_on_log to an empty value to turn this off",
        ]
    )


def test_empty_ini_turns_the_watch_off(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_fail_on_log =\n")
    result = run(pytester, SUITE, "-k", "lost_event")
    result.assert_outcomes(passed=1, deselected=2)


def test_info_records_and_other_messages_are_ignored(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
import logging

log = logging.getLogger("app")


def test_info():
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        log.info("Cannot deliver message for thread t-1 (just info)")
        log.warning("something else happened")
    finally:
        logging.getLogger().setLevel(logging.WARNING)
""",
    )
    result.assert_outcomes(passed=1)


def test_custom_patterns_and_records_from_fixture_teardown(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_fail_on_log =\n    ^lost event \\d+$\n")
    result = run(
        pytester,
        """
import logging

import pytest

log = logging.getLogger("app.events")


@pytest.fixture
def leaky():
    yield
    log.error("lost event 7")


def test_matches():
    log.warning("lost event 1")
    log.warning("Cannot deliver message for thread t-1")  # default pattern replaced


def test_teardown(leaky):
    pass


def test_fails_anyway():
    log.critical("lost event 3")
    assert False, "own failure"
""",
    )
    result.assert_outcomes(failed=2, passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "emitguard: 1 log record matches emitguard_fail_on_log",
            "- WARNING app.events: lost event 1",
        ]
    )
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_teardown*", "*ERROR app.events*"])
    result.stdout.fnmatch_lines(["*own failure*"])
    assert "- CRITICAL app.events" not in result.stdout.str()  # the test failed on its own
    assert "- WARNING app.events: Cannot deliver" not in result.stdout.str()


def test_bad_pattern_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_fail_on_log = (unclosed\n")
    result = run(pytester, "def test_x():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*emitguard_fail_on_log: bad pattern '(unclosed'*"])


# -------------------------------------------------------------------------------- report


def report_of(pytester: pytest.Pytester) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / "out" / "report.json").read_text())
    return data


def test_report_lists_every_record_per_test(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_fail_on_log =\n")
    result = run(pytester, SUITE, "--emitguard-report=out/report.json")
    result.assert_outcomes(passed=3)
    data = report_of(pytester)
    assert set(data["tests"]) == {
        "test_suite.py::test_delivered",
        "test_suite.py::test_dropped",
    }
    delivered = data["tests"]["test_suite.py::test_delivered"]
    assert [(r["thread_id"], r["seq"], r["event_type"], r["outcome"]) for r in delivered] == [
        ("t-2", 1, "agent_started", "DELIVERED"),
        ("t-2", 2, "agent_completed", "DELIVERED"),
    ]
    assert set(delivered[0]) == {
        "thread_id",
        "seq",
        "event_type",
        "outcome",
        "reason",
        "waited",
        "buffered_for",
        "attempts",
    }
    assert delivered[0]["attempts"] == 1
    dropped = data["tests"]["test_suite.py::test_dropped"]
    outcomes = sorted(r["outcome"] for r in dropped)
    assert outcomes == ["BUFFERED", "BUFFERED", "DROPPED"]
    assert next(r for r in dropped if r["outcome"] == "DROPPED")["reason"]
    assert data["totals"] == {"BUFFERED": 2, "DELIVERED": 2, "DROPPED": 1}
    result.stdout.fnmatch_lines(
        [
            "*= emitguard =*",
            "5 emission records in 2 tests",
            "  BUFFERED   2",
            "  DELIVERED  2",
            "  DROPPED    1",
            "tests with bad outcomes:",
            "  test_suite.py::test_dropped: DROPPED",
            f"report: {pytester.path / 'out' / 'report.json'}",
        ]
    )


def test_report_of_a_failing_test(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
import emitguard
from emitguard.testing import ReferenceManager


async def test_fails():
    manager = ReferenceManager()
    guard = emitguard.guard(manager, ready_timeout=0.01)
    try:
        manager.connect("u1")
        await manager.send_to_thread("t-1", {"type": "agent_started"})
    finally:
        emitguard.unguard(manager)
    assert False, "the test's own failure"
""",
        "--emitguard-report=out/report.json",
    )
    result.assert_outcomes(failed=1)
    records = report_of(pytester)["tests"]["test_suite.py::test_fails"]
    assert records
    assert all(r["thread_id"] == "t-1" and r["seq"] == 1 for r in records)
    result.stdout.fnmatch_lines(["*= emitguard =*"])


def test_no_summary_without_records_or_without_the_option(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_fail_on_log =\n")
    result = run(pytester, SUITE, "-k", "lost_event", "--emitguard-report=out/report.json")
    result.assert_outcomes(passed=1, deselected=2)
    assert report_of(pytester) == {"tests": {}, "totals": {}}
    assert "= emitguard =" not in result.stdout.str()
    result = run(pytester, SUITE)
    result.assert_outcomes(passed=3)
    assert "= emitguard =" not in result.stdout.str()


HAS_XDIST = importlib.util.find_spec("xdist") is not None


@pytest.mark.skipif(
    not HAS_XDIST, reason="pytest-xdist is not installed (pip install pytest-xdist)"
)
def test_xdist_workers_report_each_record_once(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_fail_on_log =\n")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess(
        *ASYNCIO, "-o", "asyncio_mode=auto", "-n", "2", "--emitguard-report=out/report.json"
    )
    result.assert_outcomes(passed=3)
    data = report_of(pytester)
    assert data["totals"] == {"BUFFERED": 2, "DELIVERED": 2, "DROPPED": 1}
    assert len(data["tests"]["test_suite.py::test_delivered"]) == 2
    assert len(data["tests"]["test_suite.py::test_dropped"]) == 3
    result.stdout.fnmatch_lines(["5 emission records in 2 tests"])
