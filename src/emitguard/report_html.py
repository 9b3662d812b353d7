"""A self-contained HTML page of emission timelines: per test (or demo run), per thread.

Used by the pytest plugin (``--emitguard-report=report.html``) and by ``emitguard demo --html``
/ ``emitguard simulate --html``. It takes plain records (the dicts of the JSON report: see
:func:`record_of`), so neither side imports the other. The page has inline CSS only: no
network, no JavaScript; failing tests come first, then tests with bad outcomes.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from emitguard.records import Emission

__all__ = ["BAD_OUTCOMES", "Section", "record_of", "render_html"]

BAD_OUTCOMES = frozenset({"DROPPED", "EXPIRED", "FAILED", "REJECTED"})
"""Terminal outcomes that mean the event did not reach its thread."""

Record = Mapping[str, Any]


def record_of(emission: Emission) -> dict[str, Any]:
    """The plain record of one emission (the JSON report's shape)."""
    return {
        "thread_id": emission.thread_id,
        "seq": emission.seq,
        "event_type": emission.event_type,
        "outcome": emission.outcome.name,
        "reason": emission.reason,
        "waited": emission.waited,
        "buffered_for": emission.buffered_for,
        "attempts": emission.attempts,
    }


@dataclasses.dataclass(frozen=True)
class Section:
    """One test (or one demo scenario): its name, its status and its records in order."""

    name: str
    status: str
    """``failed``, ``passed``, ``skipped``, ... (``failed`` sorts first)."""
    records: Sequence[Record]
    detail: str = ""
    """A line under the name (the failure's first line, a verdict)."""

    @property
    def bad(self) -> int:
        return sum(1 for record in self.records if record.get("outcome") in BAD_OUTCOMES)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328}
h1{font-size:20px;margin:0 0 4px}
h2{font-size:16px;margin:0;word-break:break-all}
.summary{color:#57606a;margin:0 0 16px}
section{border:1px solid #d0d7de;border-radius:6px;margin:0 0 16px;padding:12px 16px}
section.failed{border-left:6px solid #cf222e}
section.passed{border-left:6px solid #1a7f37}
section.other{border-left:6px solid #9a6700}
.status{font-weight:600;text-transform:uppercase;font-size:12px;margin-right:6px}
.failed .status{color:#cf222e}.passed .status{color:#1a7f37}.other .status{color:#9a6700}
.detail{color:#57606a;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
white-space:pre-wrap;margin:4px 0 0}
h3{font-size:14px;margin:12px 0 4px;font-family:ui-monospace,Menlo,Consolas,monospace}
table{border-collapse:collapse;width:100%;table-layout:fixed}
col.seq{width:4em}col.event{width:11em}col.reason{width:38%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{font-size:12px;color:#57606a;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.open{color:#9a6700;font-size:12px;font-style:italic}
.step{display:inline-block;border-radius:10px;padding:0 8px;margin:1px 2px 1px 0;
font-size:12px;border:1px solid transparent}
.arrow{color:#8c959f;margin:0 2px}
.DELIVERED,.FLUSHED{background:#dafbe1;border-color:#aceebb}
.BUFFERED,.WAITED{background:#fff8c5;border-color:#eedc82}
.DROPPED,.EXPIRED,.FAILED,.REJECTED{background:#ffebe9;border-color:#ffcecb;font-weight:600}
tr.bad td{background:#fff5f5}
.reason{color:#57606a;font-size:12px}
.empty{color:#57606a;font-style:italic}
"""


def render_html(sections: Iterable[Section], *, title: str = "emitguard report") -> str:
    """The whole page: failing sections first, then those with bad outcomes, then the rest."""
    ordered = sorted(
        sections,
        key=lambda s: (s.status != "failed", s.bad == 0, s.name),
    )
    failed = sum(1 for s in ordered if s.status == "failed")
    records = sum(len(s.records) for s in ordered)
    bad = sum(s.bad for s in ordered)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="summary">{_plural(len(ordered), "section")}, {failed} failed; '
        f"{_plural(records, 'emission record')}, {bad} with a bad outcome (dropped, expired, "
        f"failed, rejected). Each row is one emission of a thread, in seq order: what "
        f"happened to it, step by step, and why.</p>",
    ]
    parts += [_section(section) for section in ordered]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _section(section: Section) -> str:
    kind = section.status if section.status in ("failed", "passed") else "other"
    out = [
        f'<section class="{kind}">',
        f'<h2><span class="status">{_e(section.status)}</span>{_e(section.name)}</h2>',
    ]
    if section.detail:
        out.append(f'<p class="detail">{_e(section.detail)}</p>')
    threads: dict[str, list[Record]] = {}
    for record in section.records:
        threads.setdefault(str(record.get("thread_id")), []).append(record)
    if not threads:
        out.append('<p class="empty">no emissions recorded</p>')
    bad_first = sorted(threads.items(), key=lambda item: (not _has_bad(item[1]), _natural(item[0])))
    for thread_id, records in bad_first:
        out.append(f"<h3>thread {_e(thread_id)}</h3>")
        out.append(_timeline(records))
    out.append("</section>")
    return "\n".join(out)


def _natural(text: str) -> list[tuple[int, int | str]]:
    """A sort key putting ``thread-2`` before ``thread-10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]


def _has_bad(records: Sequence[Record]) -> bool:
    return any(record.get("outcome") in BAD_OUTCOMES for record in records)


def _timeline(records: Sequence[Record]) -> str:
    """One row per emission (seq): its steps in the order they were recorded."""
    by_seq: dict[Any, list[Record]] = {}
    for record in records:
        by_seq.setdefault(record.get("seq"), []).append(record)
    rows = [
        '<table><col class="seq"><col class="event"><col><col class="reason">'
        "<tr><th>seq</th><th>event</th><th>timeline</th><th>reason</th></tr>"
    ]
    for seq in sorted(by_seq, key=lambda s: (s is None, s if isinstance(s, int) else 0)):
        steps = by_seq[seq]
        event = next((r.get("event_type") for r in steps if r.get("event_type")), None)
        reasons = [str(r["reason"]) for r in steps if r.get("reason")]
        bad = _has_bad(steps)
        rows.append(
            f'<tr class="{"bad" if bad else "ok"}"><td class="num">{_e(str(seq))}</td>'
            f"<td>{_e(event or '-')}</td><td>{_steps(steps)}</td>"
            f'<td class="reason">{_e("; ".join(reasons))}</td></tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)


def _steps(steps: Sequence[Record]) -> str:
    chips = ['<span class="step">sent</span>']
    waited = max((float(r.get("waited") or 0.0) for r in steps), default=0.0)
    if waited > 0:
        chips.append(f'<span class="step WAITED">waited {_ms(waited)}</span>')
    for record in steps:
        outcome = str(record.get("outcome"))
        text = outcome.lower()
        if outcome != "BUFFERED" and float(record.get("buffered_for") or 0.0) > 0:
            text += f" after {_ms(float(record['buffered_for']))} in the buffer"
        attempts = int(record.get("attempts") or 0)
        if attempts > 1:
            text += f" ({attempts} attempts)"
        chips.append(f'<span class="step {_e(outcome)}">{_e(text)}</span>')
    timeline = '<span class="arrow">&rarr;</span>'.join(chips)
    if all(record.get("outcome") == "BUFFERED" for record in steps):
        timeline += ' <span class="open">(no terminal outcome recorded: still buffered)</span>'
    return timeline


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
