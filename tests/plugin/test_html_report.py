"""The HTML emission report (``--emitguard-report=report.html``) and ``emitguard ... --html``."""

from __future__ import annotations

import html.parser
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from emitguard import cli
from emitguard.report_html import Section, render_html

pytest_plugins = ["pytester"]

ASYNCIO = ("-p", "asyncio", "-o", "asyncio_default_fixture_loop_scope=function")

SUITE = """
import emitguard
from emitguard.testing import ReferenceManager


async def test_a_delivered():
    manager = ReferenceManager()
    emitguard.guard(manager)
    try:
        manager.connect("u1")
        manager.update_connection_thread("u1", "t-ok")
        await manager.send_to_thread("t-ok", {"type": "agent_started"})
    finally:
        emitguard.unguard(manager)


async def test_z_times_out():
    manager = ReferenceManager()
    emitguard.guard(manager, ready_timeout=0.01, on_unready="buffer", max_per_thread=1)
    try:
        manager.connect("u1")
        await manager.send_to_thread("t-lost", {"type": "agent_started"})
        await manager.send_to_thread("t-lost", {"type": "agent_thinking"})
    finally:
        emitguard.unguard(manager)
    assert False, "the agent's events never reached t-lost"
"""


class _Page(html.parser.HTMLParser):
    """Collects the page's text and checks that it uses no script and no remote resource."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and "//" in value:
                self.remote.append(value)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def make_report(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, Path]:
    pytester.makeini("[pytest]\nemitguard_fail_on_log =\n")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest(
        *ASYNCIO, "-o", "asyncio_mode=auto", "--emitguard-report=out/report.html", *args
    )
    return result, pytester.path / "out" / "report.html"


def test_html_report_puts_the_failing_test_first_with_its_timeline(
    pytester: pytest.Pytester,
) -> None:
    result, path = make_report(pytester)
    result.assert_outcomes(passed=1, failed=1)
    page = path.read_text(encoding="utf-8")
    parsed = parse(page)
    assert "script" not in parsed.tags
    assert parsed.remote == []
    assert "<style>" in page
    text = " ".join(" ".join(parsed.text).split())
    failing = text.index("test_suite.py::test_z_times_out")
    assert failing < text.index("test_suite.py::test_a_delivered")  # failing first
    assert "failed" in text[failing - 10 : failing]
    assert "call: AssertionError: the agent's events never reached t-lost" in text
    assert "thread t-lost" in text
    assert "sent → buffered → dropped" in text  # the one the bounded buffer evicted
    assert "sent → buffered" in text
    result.stdout.fnmatch_lines([f"report: {path}"])


def test_json_stays_the_default(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_fail_on_log =\n")
    pytester.makepyfile(test_suite=SUITE)
    pytester.runpytest(
        *ASYNCIO, "-o", "asyncio_mode=auto", "--emitguard-report=out/report.json"
    ).assert_outcomes(passed=1, failed=1)
    assert (pytester.path / "out" / "report.json").read_text().startswith("{")


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="needs pytest-xdist")
def test_html_report_under_xdist_knows_which_test_failed(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_fail_on_log =\n")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess(
        *ASYNCIO, "-o", "asyncio_mode=auto", "-n", "2", "--emitguard-report=out/report.html"
    )
    result.assert_outcomes(passed=1, failed=1)
    text = " ".join(parse((pytester.path / "out" / "report.html").read_text()).text)
    assert text.index("test_z_times_out") < text.index("test_a_delivered")
    assert "the agent's events never reached t-lost" in text


def test_render_escapes_and_orders_sections() -> None:
    page = render_html(
        [
            Section("b <ok>", "passed", [{"thread_id": "t", "seq": 1, "outcome": "DELIVERED"}]),
            Section(
                "a",
                "passed",
                [{"thread_id": "t<1>", "seq": 1, "outcome": "EXPIRED", "reason": "too <old>"}],
            ),
            Section("c", "failed", []),
        ]
    )
    assert "b &lt;ok&gt;" in page
    assert "too &lt;old&gt;" in page
    text = " ".join(parse(page).text)
    assert text.index("c") < text.index("thread t<1>") < text.index("b <ok>")
    assert "no emissions recorded" in text


def test_simulate_writes_the_guarded_runs_timelines(tmp_path: Path) -> None:
    path = tmp_path / "demo.html"
    code = cli.main(
        ["simulate", "--runs", "10", "--drop-rate", "0.5", "--no-progress", "--html", str(path)]
    )
    assert code == 0
    text = " ".join(" ".join(parse(path.read_text(encoding="utf-8")).text).split())
    assert "guarded run (10 runs, seed 7, setup guard, virtual clock)" in text
    assert "PASS: unguarded lost" in text
    assert "thread thread-0" in text
    assert "sent → waited" in text


CHROMIUM = next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None
)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_html_report_in_headless_chromium(pytester: pytest.Pytester) -> None:
    assert CHROMIUM is not None
    result, path = make_report(pytester)
    result.assert_outcomes(passed=1, failed=1)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    dom = subprocess.run(
        [*flags, "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "test_suite.py::test_z_times_out" in dom
    assert "thread t-lost" in dom
    assert dom.index("test_z_times_out") < dom.index("test_a_delivered")
    assert "the agent's events never reached t-lost" in dom
    shot = pytester.path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,900", path.as_uri()],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert shot.stat().st_size > 10_000
