"""The ``emitguard`` command line.

    emitguard demo      [--runs N] [--seed S] [--lag SECONDS] [--drop-rate R] [--json] ...
    emitguard simulate  [the same options]

``demo`` (added by the Starlette adapter through the ``emitguard_add_commands`` hook) replays
the race of the emission failure report over real sockets: a Starlette app under uvicorn and
``websockets`` clients. ``simulate`` replays it in memory on a virtual clock, reproducibly and
fast (1,000 runs in about a second). Both run bare and then guarded, print what reached the clients,
and exit 0 when the guarded run lost, duplicated and reordered nothing, 1 otherwise (2 for
bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from emitguard import __version__, hooks
from emitguard.demo import (
    DemoConfig,
    DemoReport,
    ProgressBar,
    notes,
    render_table,
    run_demo,
    verdict,
)
from emitguard.hooks import hookimpl
from emitguard.records import Emission
from emitguard.report_html import Section, record_of, render_html

__all__ = [
    "add_demo_arguments",
    "build_parser",
    "main",
    "print_report",
    "recording",
    "write_html",
]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bounded(what: str, low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` to ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_seconds = _bounded("a number of seconds >= 0", 0.0)
_fraction = _bounded("a number from 0 to 1", 0.0, 1.0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``emitguard`` command, with the plugins' commands."""
    parser = argparse.ArgumentParser(
        prog="emitguard", description="emitguard: no lost WebSocket events."
    )
    parser.add_argument("--version", action="version", version=f"emitguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    simulate = commands.add_parser(
        "simulate",
        help="replay the lost-events race in memory, unguarded and guarded, side by side",
        description=(
            "Simulate agent runs whose events race the thread association (and, in some "
            "runs, a dropped connection) on the in-memory reference legacy manager, on a "
            "virtual clock, first bare, then guarded; compare what reached the clients. "
            "Exit code 0 when the guarded run lost and reordered nothing, 1 otherwise."
        ),
    )
    add_demo_arguments(simulate, DemoConfig())
    simulate.set_defaults(run=_simulate)
    hooks.plugin_manager().hook.emitguard_add_commands(commands=commands)
    return parser


def add_demo_arguments(parser: argparse.ArgumentParser, defaults: DemoConfig) -> None:
    """The options every demo command shares (``--runs``, ``--seed``, ``--lag``, ...)."""
    parser.add_argument(
        "--runs",
        type=_positive_int,
        default=defaults.runs,
        help="agent runs, one thread each (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)"
    )
    parser.add_argument(
        "--lag",
        type=_seconds,
        default=defaults.lag,
        metavar="SECONDS",
        help="largest random thread-association lag (default: %(default)s)",
    )
    parser.add_argument(
        "--drop-rate",
        type=_fraction,
        default=defaults.drop_rate,
        metavar="R",
        help="share of runs whose connection drops mid-run and reconnects (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--html",
        metavar="PATH",
        default=None,
        help="also write the guarded run's emission timelines, per thread, as an HTML page",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--legacy-logs",
        action="store_true",
        help="let the legacy manager's warnings through (they are counted, and hidden, by default)",
    )


def print_report(report: DemoReport, as_json: bool) -> int:
    """Print a demo's report (table and verdict, or JSON); return the exit code."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print(render_table(report))
        print()
        for note in notes(report):
            print(textwrap.fill(note, width=100))
        print()
        print(verdict(report))
    return 0 if report.ok else 1


class _Recorder:
    """An emitguard listener keeping every emission's plain record."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    @hookimpl
    def emitguard_emission(self, emission: Emission) -> None:
        self.records.append(record_of(emission))


@contextlib.contextmanager
def recording(path: str | None) -> Iterator[_Recorder | None]:
    """Record every emission meanwhile when ``path`` is given (for :func:`write_html`)."""
    if path is None:
        yield None
        return
    recorder = _Recorder()
    hooks.register(recorder)
    try:
        yield recorder
    finally:
        hooks.unregister(recorder)


def write_html(path: str | None, report: DemoReport, recorder: _Recorder | None) -> None:
    """Write the guarded run's timelines (what ``recorder`` saw) to ``path``."""
    if path is None or recorder is None:
        return
    name = f"guarded run ({report.config.runs} runs, seed {report.config.seed}, "
    name += f"setup {report.setup}, {report.clock} clock)"
    section = Section(name, "passed" if report.ok else "failed", recorder.records, verdict(report))
    page = render_html([section], title="emitguard demo: emission timelines per thread")
    Path(path).write_text(page, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


def _simulate(args: argparse.Namespace) -> int:
    config = DemoConfig(runs=args.runs, seed=args.seed, lag=args.lag, drop_rate=args.drop_rate)
    progress = ProgressBar(sys.stderr, enabled=not args.no_progress and sys.stderr.isatty())
    with recording(args.html) as recorder:
        report = run_demo(config, progress=progress, show_legacy_logs=args.legacy_logs)
    write_html(args.html, report, recorder)
    return print_report(report, args.json)
