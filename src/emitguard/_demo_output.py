"""The demo's output: the side-by-side table, the verdict line and the progress bar."""

from __future__ import annotations

import sys
from typing import Any, Protocol, TextIO

from emitguard.states import Outcome


class DemoReport(Protocol):
    """What the output reads of :class:`emitguard.demo.DemoReport` (named here without
    importing it: the demo imports this module)."""

    @property
    def unguarded(self) -> Any: ...

    @property
    def guarded(self) -> Any: ...

    @property
    def clock(self) -> str: ...

    @property
    def setup(self) -> str: ...

    @property
    def config(self) -> Any: ...

    @property
    def scenario_digest(self) -> str: ...

    @property
    def workers(self) -> int: ...

__all__ = ["VARIES", "ProgressBar", "notes", "render_table", "table_rows", "verdict"]


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _millis(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


TERMINAL: tuple[Outcome, ...] = tuple(outcome for outcome in Outcome if outcome.terminal)


VARIES: dict[str, dict[str, tuple[str, ...]]] = {
    "virtual": {
        "unguarded": ("wall_time",),
        "guarded": ("wall_time", "barrier_wait_p50", "barrier_wait_p99"),
    },
    "network": {
        "unguarded": ("wall_time", "latency_p50", "latency_p99", "events_per_s"),
        "guarded": (
            "wall_time",
            "latency_p50",
            "latency_p99",
            "events_per_s",
            "barrier_wait_p50",
            "barrier_wait_p99",
            "legacy_warnings",
        ),
    },
}
"""Per clock, the fields of each side that depend on timing and vary between two runs of one
seed; every other field is fixed by the seed (``tests`` run each demo twice to check it)."""


def table_rows(report: DemoReport) -> list[tuple[str, str, str]]:
    """The rows of the comparison table: ``(metric, unguarded, guarded)``, in two parts with a
    heading row each: what the seed fixes, then what varies with timing (and the network).

    The guard's outcome rows are terminal outcomes, one per event: with what is still
    buffered they add up to the events emitted. ``BUFFERED`` is the path some events took
    on the way to one of them, shown apart and not added in.
    """
    bare, safe = report.unguarded, report.guarded
    network = report.clock == "network"
    warnings = (
        "legacy 'Cannot deliver' warnings",
        str(bare.legacy_warnings),
        str(safe.legacy_warnings),
    )
    fixed: list[tuple[str, str, str]] = [
        ("runs (one thread each)", str(bare.runs), str(safe.runs)),
        ("runs with a dropped connection", str(bare.drops), str(safe.drops)),
        ("events emitted", str(bare.emitted), str(safe.emitted)),
        ("events delivered (unique)", str(bare.delivered), str(safe.delivered)),
        ("events lost", str(bare.lost), str(safe.lost)),
        ("events out of order", str(bare.out_of_order), str(safe.out_of_order)),
        ("extra copies, same seq (client drops)", str(bare.duplicates), str(safe.duplicates)),
        ("events re-sent under a new seq", str(bare.repeated), str(safe.repeated)),
    ]
    if not network:
        fixed.append(warnings)
    outcomes = safe.outcomes or {}
    terminal = [(outcome.value, outcomes.get(outcome.value, 0)) for outcome in TERMINAL]
    fixed += [(f"guard outcome: {name}", "n/a", str(count)) for name, count in terminal]
    fixed += [
        ("still buffered after drain", "n/a", _count(safe.still_buffered)),
        (
            "  total (= events emitted)" if report.workers == 1 else "  total (see the notes)",
            "n/a",
            str(sum(count for _, count in terminal) + (safe.still_buffered or 0)),
        ),
        ("path: waited in the buffer", "n/a", str(outcomes.get(Outcome.BUFFERED.value, 0))),
        ("path: held at the barrier", "n/a", _count(safe.held)),
    ]
    measured: list[tuple[str, str, str]] = []
    if network:
        measured.append(warnings)
    measured += [
        ("barrier wait p50 (ms)", "n/a", _millis(safe.barrier_wait_p50)),
        ("barrier wait p99 (ms)", "n/a", _millis(safe.barrier_wait_p99)),
    ]
    if safe.latency_p50 is not None or bare.latency_p50 is not None:
        measured += [
            (
                "latency covers (events that arrived)",
                f"{bare.delivered}/{bare.emitted}",
                f"{safe.delivered}/{safe.emitted}",
            ),
            ("delivery latency p50 (ms)", _millis(bare.latency_p50), _millis(safe.latency_p50)),
            ("delivery latency p99 (ms)", _millis(bare.latency_p99), _millis(safe.latency_p99)),
            ("events delivered per second", _rate(bare.events_per_s), _rate(safe.events_per_s)),
        ]
    measured.append(("wall time (s)", f"{bare.wall_time:.2f}", f"{safe.wall_time:.2f}"))
    where = "timing and the network" if network else "timing"
    return [
        (f"[fixed by the seed: the same on every run of seed {report.config.seed}]", "", ""),
        *fixed,
        (f"[measured: these vary from run to run with {where}]", "", ""),
        *measured,
    ]


def notes(report: DemoReport) -> list[str]:
    """What the table's numbers cover, and which of them vary between two runs of one seed."""
    bare, safe = report.unguarded, report.guarded
    config = report.config
    lines = [
        f"Scenario: seed {config.seed}, {bare.runs} runs, {bare.drops} with a dropped "
        f"connection; plans {report.scenario_digest} (equal digests, equal scenarios).",
        "Outcomes: one terminal outcome per event; 'waited in the buffer' and 'held at the "
        "barrier' are paths some events took on the way, not added to the total.",
    ]
    if report.workers > 1:
        lines.append(
            f"Across {report.workers} worker processes on one Redis: each run's agent emits in "
            f"one worker and its client reads on another (and reconnects to a third, or to the "
            f"agent's with 2 workers). Unguarded, each worker's manager knows only its own "
            f"sockets. Guarded, outcomes are summed over the workers: the agent's worker records "
            f"each send BUFFERED in the shared log, the worker holding the socket FLUSHED as it "
            f"hands it over, or the worker a client resumes on for what it got from the replay "
            f"and no worker had handed over; the log's delivered mark decides which worker "
            f"records an entry, so none is counted twice, and the total can fall a few short "
            f"when a record is made after the worker's report. Guarded 'Cannot deliver' "
            f"warnings are deliveries a worker tried to a socket whose client had just killed it "
            f"(before the worker noticed): the events stay in the log and reach the client "
            f"when it resumes on another worker."
        )
    if report.clock == "network":
        lines += [
            f"Latency: from the agent's send to the client's receipt of the first copy, over the "
            f"events that arrived: unguarded {bare.delivered} of {bare.emitted} (the "
            f"{bare.lost} it lost, mostly the early ones, are not in its figures); guarded "
            f"{safe.delivered} of {safe.emitted}, including the waits for the association.",
            f"Same seed, same scenario (setup: {report.setup}): the seed fixes which threads "
            f"run, which events each agent sends, which clients drop after which event, "
            f"silently or noticed, and the order of every step; each step waits for those its "
            f"plan puts first, so what the clients receive and what the bare app loses are the "
            f"same on every run. Latency, events per second, barrier waits and wall time "
            f"depend on the machine and the network and vary from run to run, as do the "
            f"guarded manager's warnings (the guard retries a failed send with a backoff in "
            f"real time).",
        ]
    else:
        lines.append(
            "Same seed, same counts: the simulation runs on a virtual clock; barrier waits and "
            "wall time are measured on the real clock and vary."
        )
    return lines


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _heading(row: tuple[str, str, str]) -> bool:
    """A part's heading row: its text in the first cell, the others empty."""
    return row[1] == row[2] == ""


def render_table(report: DemoReport) -> str:
    """The side-by-side table as plain text."""
    header = ("metric", "unguarded", "guarded")
    rows = table_rows(report)
    cells = [header, *(row for row in rows if not _heading(row))]
    widths = [max(len(row[column]) for row in cells) for column in range(3)]

    def line(row: tuple[str, str, str]) -> str:
        if _heading(row):
            return row[0]
        return f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}".rstrip()

    rule = ("-" * widths[0], "-" * widths[1], "-" * widths[2])
    return "\n".join([line(header), line(rule), *(line(row) for row in rows)])


def verdict(report: DemoReport) -> str:
    """One line: what the guard changed, or what it failed to do."""
    bare, safe = report.unguarded, report.guarded
    share = bare.lost / bare.emitted if bare.emitted else 0.0
    if safe.ok:
        return (
            f"PASS: unguarded lost {bare.lost}/{bare.emitted} events ({share:.0%}); "
            f"guarded delivered all {safe.delivered} in order, 0 lost."
        )
    repeated = f", {safe.repeated} repeated" if safe.repeated else ""
    return (
        f"FAIL: guarded lost {safe.lost}/{safe.emitted} events, {safe.out_of_order} out of "
        f"order{repeated}, {_count(safe.still_buffered)} still buffered "
        f"(unguarded lost {bare.lost})."
    )


class ProgressBar:
    """A one-line text progress bar (``\\r``-redrawn); silent when disabled."""

    def __init__(self, stream: TextIO | None = None, *, width: int = 20, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = enabled
        self._last: tuple[str, int] | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled or (phase, done) == self._last:
            return
        self._last = (phase, done)
        filled = self.width * done // total if total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        digits = len(str(total))
        self.stream.write(f"\r{phase:<9} [{bar}] {done:>{digits}}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
