"""Session-wide watches: fail tests on lost-event log lines, and write an emission report.

Registered with pytest by :mod:`pytest_emitguard.plugin`, which also declares its options.

* Log watch (ini ``emitguard_fail_on_log``): a test fails when, between the start of its setup
  and the end of its teardown, the root logger sees a WARNING-or-worse record whose message
  matches one of the regular expressions (searched, not anchored).  Records from loggers with
  ``propagate = False`` never reach the root logger and are not seen.  The default is empty:
  the watch is off until a project's configuration lists patterns, so a project that merely has
  emitguard installed never fails on its log lines.
* Report (``--emitguard-report=PATH``): every emission record of the session, per test id, as
  JSON, or as a self-contained HTML page of timelines when PATH ends in ``.html`` (per test,
  per thread, each emission's steps and reasons, failing tests first), plus an "emitguard"
  terminal summary section.  The section is printed only when the option is given and at
  least one record was collected.  Under pytest-xdist, workers send their records to the
  controller, which alone writes the file.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import emitguard
from emitguard.report_html import Section, record_of, render_html

if TYPE_CHECKING:
    from emitguard import Emission

__all__ = ["EmissionReport"]

BAD = ("DROPPED", "EXPIRED", "FAILED", "REJECTED")
"""Outcomes that put a test in the summary's list of tests with bad outcomes."""

NO_TEST = "(outside tests)"
"""Report key for records made while no test was running (e.g. at collection)."""


# --------------------------------------------------------------------------- log watch

_PATTERNS = pytest.StashKey[list["re.Pattern[str]"]]()
_HANDLER = pytest.StashKey["_LogCollector"]()


class _LogCollector(logging.Handler):
    """Keeps the WARNING-or-worse records whose message matches a pattern."""

    def __init__(self, patterns: list[re.Pattern[str]]) -> None:
        super().__init__(level=logging.WARNING)
        self.patterns = patterns
        self.records: list[logging.LogRecord] = []
        self.test_failed = False
        self.suspended: list[_LogCollector] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = _message(record)
        if any(pattern.search(message) for pattern in self.patterns):
            self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        taken, self.records = self.records, []
        return taken


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format string must not break the test run
        return str(record.msg)


def _log_failure(records: list[logging.LogRecord]) -> str:
    noun = "log record matches" if len(records) == 1 else "log records match"
    lines = [f"emitguard: {len(records)} {noun} emitguard_fail_on_log"]
    lines.extend(f"- {r.levelname} {r.name}: {_message(r)}" for r in records)
    lines += ["", "set emitguard_fail_on_log to an empty value to turn this off"]
    return "\n".join(lines)


def _patterns(config: pytest.Config) -> list[re.Pattern[str]]:
    """The compiled ``emitguard_fail_on_log`` patterns (empty when the watch is off)."""
    if _PATTERNS in config.stash:
        return config.stash[_PATTERNS]
    lines = config.getini("emitguard_fail_on_log")
    compiled = []
    for line in lines:
        try:
            compiled.append(re.compile(line))
        except re.error as exc:
            raise pytest.UsageError(f"emitguard_fail_on_log: bad pattern {line!r}: {exc}") from None
    config.stash[_PATTERNS] = compiled
    return compiled


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    patterns = _patterns(item.config)
    root = logging.getLogger()
    # A test running pytest in-process (pytester) must not fail on its inner tests' records:
    # the innermost test's watch (even one that is off) takes over until its teardown.
    outer = [h for h in root.handlers if isinstance(h, _LogCollector)]
    if patterns or outer:
        handler = _LogCollector(patterns)
        item.stash[_HANDLER] = handler
        handler.suspended = outer
        for suspended in outer:
            root.removeHandler(suspended)
        root.addHandler(handler)
    try:
        return (yield)
    except BaseException:
        if _HANDLER in item.stash:
            item.stash[_HANDLER].test_failed = True
        raise


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    handler = item.stash.get(_HANDLER, None)
    try:
        result = yield
    except BaseException:
        if handler is not None:
            handler.test_failed = True
        raise
    if handler is not None and handler.records:
        pytest.fail(_log_failure(handler.take()), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    handler = item.stash.get(_HANDLER, None)
    try:
        result = yield
    finally:
        if handler is not None:
            root = logging.getLogger()
            root.removeHandler(handler)
            for outer in handler.suspended:
                root.addHandler(outer)
            del item.stash[_HANDLER]
    if handler is not None and handler.records and not handler.test_failed:
        pytest.fail(_log_failure(handler.take()), pytrace=False)
    return result


# ------------------------------------------------------------------------------ report


def pytest_configure(config: pytest.Config) -> None:
    _patterns(config)  # a bad pattern is a usage error before any test runs
    path = config.getoption("emitguard_report")
    if not path:
        return
    report = EmissionReport(config, Path(config.invocation_params.dir, path))
    config.pluginmanager.register(report, "emitguard-report")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistMerge(report), "emitguard-report-xdist")


class _Listener:
    """The emitguard listener: routes every record to the test that is running."""

    def __init__(self, report: EmissionReport) -> None:
        self.report = report

    @emitguard.hookimpl
    def emitguard_emission(self, emission: Emission) -> None:
        self.report.add(self.report.current, _record(emission))


def _record(emission: Emission) -> dict[str, Any]:
    return record_of(emission)


class EmissionReport:
    """Collects the session's emission records per test id; writes and summarizes them."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.path = path
        self.tests: dict[str, list[dict[str, Any]]] = {}
        self.current = NO_TEST
        self.status: dict[str, tuple[str, str]] = {}
        """Per test id: ``(outcome, first line of the failure)`` from its reports."""
        self.worker = hasattr(config, "workerinput")
        self._lock = threading.Lock()
        self._listener = _Listener(self)

    def add(self, nodeid: str, record: dict[str, Any]) -> None:
        with self._lock:
            self.tests.setdefault(nodeid, []).append(record)

    def merge(self, tests: dict[str, list[dict[str, Any]]]) -> None:
        for nodeid, records in tests.items():
            for record in records:
                self.add(nodeid, record)

    def totals(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for records in self.tests.values():
            for record in records:
                counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
        return dict(sorted(counts.items()))

    def as_json(self) -> dict[str, Any]:
        return {"tests": self.tests, "totals": self.totals()}

    @property
    def html(self) -> bool:
        """Write HTML (the path ends in ``.html`` or ``.htm``) rather than JSON."""
        return self.path.suffix.lower() in (".html", ".htm")

    def as_html(self) -> str:
        sections = [
            Section(
                nodeid,
                self.status.get(nodeid, ("unknown", ""))[0],
                self.tests.get(nodeid, []),
                self.status.get(nodeid, ("", ""))[1],
            )
            for nodeid in sorted({*self.tests, *self.status} - {NO_TEST})
        ]
        if self.tests.get(NO_TEST):
            sections.append(Section("(outside any test)", "other", self.tests[NO_TEST]))
        return render_html(sections, title="emitguard: emission timelines per test")

    # pytest hooks

    def pytest_sessionstart(self) -> None:
        emitguard.register(self._listener)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        self.current = item.nodeid
        try:
            return (yield)
        finally:
            self.current = NO_TEST

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome, detail = self.status.get(report.nodeid, ("passed", ""))
        if report.failed and outcome != "failed":
            lines = report.longreprtext.strip().splitlines()
            error = next((line for line in lines if line.startswith("E ")), "")
            outcome, detail = "failed", f"{report.when}: {error[1:].strip() or report.outcome}"
        elif report.skipped and outcome == "passed":
            outcome = "skipped"
        self.status[report.nodeid] = (outcome, detail)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        emitguard.unregister(self._listener)
        if self.worker:
            self.config.workeroutput["emitguard"] = self.tests  # type: ignore[attr-defined]
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.html:
            self.path.write_text(self.as_html(), encoding="utf-8")
        else:
            self.path.write_text(json.dumps(self.as_json(), indent=2) + "\n", encoding="utf-8")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.worker or not self.tests:
            return
        tr = terminalreporter
        totals = self.totals()
        records = sum(totals.values())
        tr.write_sep("=", "emitguard")
        tr.write_line(f"{records} emission records in {len(self.tests)} tests")
        for outcome, count in totals.items():
            tr.write_line(f"  {outcome:<10} {count}")
        bad = {
            nodeid: sorted({r["outcome"] for r in records if r["outcome"] in BAD})
            for nodeid, records in self.tests.items()
        }
        bad = {nodeid: outcomes for nodeid, outcomes in bad.items() if outcomes}
        if bad:
            tr.write_line("tests with bad outcomes:")
            for nodeid, outcomes in bad.items():
                tr.write_line(f"  {nodeid}: {', '.join(outcomes)}")
        tr.write_line(f"report: {self.path}")


class _XdistMerge:
    """Controller side under pytest-xdist: merges each worker's records as it goes down.

    Registered only when xdist is present, since ``pytest_testnodedown`` is an xdist hook.
    """

    def __init__(self, report: EmissionReport) -> None:
        self.report = report

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        output = getattr(node, "workeroutput", None) or {}
        tests = output.get("emitguard")
        if tests:
            self.report.merge(tests)
