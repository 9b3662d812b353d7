"""The ledger of every emission recorded during one test, with readable assertions."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import emitguard
from emitguard import Emission, Guard, Outcome

__all__ = ["BAD_OUTCOMES", "EmissionLedger"]

BAD_OUTCOMES = frozenset(
    {Outcome.DROPPED, Outcome.EXPIRED, Outcome.FAILED, Outcome.REJECTED, Outcome.BUFFERED}
)
"""Final outcomes that fail a test at teardown (BUFFERED: still undelivered)."""

_Key = tuple[int, Hashable, int]
"""An emission: its guard (``id()`` of a guard the ledger holds), thread and seq. Not the
guard's name: two guards may share one (two instances of one manager class). Emissions
outside their thread's order (seq 0: rejected, passed through, greetings) each get a key of
their own (a negative count)."""


class EmissionLedger:
    """Every :class:`~emitguard.Emission` record any guard made while it was registered."""

    def __init__(self) -> None:
        self.records: list[Emission] = []
        self._keyed: list[tuple[_Key, Emission]] = []
        """Every record with the emission it belongs to."""
        self._guards: dict[int, Guard] = {}
        """The guards seen, by ``id()``; holding them keeps those ids theirs."""

    @emitguard.hookimpl
    def emitguard_emission(self, emission: Emission, guard: Guard) -> None:
        """Collect a record (the engine calls this for every guard)."""
        self.records.append(emission)
        self._guards.setdefault(id(guard), guard)
        seq = emission.seq or -len(self._keyed) - 1
        self._keyed.append(((id(guard), emission.thread_id, seq), emission))

    def guards(self) -> list[Guard]:
        """The guards that recorded an emission while this ledger listened."""
        return list(self._guards.values())

    # ------------------------------------------------------------------ queries

    def by_thread(self, thread_id: Hashable) -> list[Emission]:
        """Every record of one thread, in the order they were made."""
        return [r for r in self.records if r.thread_id == thread_id]

    def by_type(self, event_type: str) -> list[Emission]:
        """Every record of one event type."""
        return [r for r in self.records if r.event_type == event_type]

    def by_outcome(self, outcome: Outcome | str) -> list[Emission]:
        """Every record with one outcome (an :class:`Outcome` or its name, any case)."""
        wanted = _outcome(outcome)
        return [r for r in self.records if r.outcome is wanted]

    def final(self) -> list[Emission]:
        """The latest record of every emission, in the order emissions were first seen."""
        return list(self._latest().values())

    def _latest(self) -> dict[_Key, Emission]:
        latest: dict[_Key, Emission] = {}
        for key, record in self._keyed:
            latest[key] = record
        return latest

    def types(self, thread_id: Hashable) -> list[str | None]:
        """The event types delivered to a thread (DELIVERED or FLUSHED), in ``seq`` order."""
        done = [r for r in self.final() if r.thread_id == thread_id and r.outcome in _DELIVERED]
        return [r.event_type for r in sorted(done, key=lambda r: r.seq)]

    def problems(self, allow: Iterable[Outcome] = ()) -> list[Emission]:
        """Emissions whose final outcome is bad and not allowed."""
        allowed = set(allow)
        return [r for r in self.final() if r.outcome in BAD_OUTCOMES and r.outcome not in allowed]

    # --------------------------------------------------------------- assertions

    def assert_delivered(
        self, *event_types: str, thread: Hashable | None = None, in_order: bool = True
    ) -> None:
        """Assert these event types were delivered (to ``thread``, if given), in this order
        among themselves unless ``in_order=False``."""
        threads = (
            [thread]
            if thread is not None
            else sorted({r.thread_id for r in self.records}, key=repr)
        )
        seen = [t for name in threads for t in self.types(name)]
        missing = [t for t in event_types if t not in seen]
        where = f" to thread {thread}" if thread is not None else ""
        if missing:
            raise AssertionError(
                f"not delivered{where}: {', '.join(missing)}; delivered: {_list(seen)}"
            )
        if in_order:
            picked = [t for t in seen if t in event_types]
            if _dedupe(picked) != list(_dedupe(event_types)):
                raise AssertionError(
                    f"delivered{where} out of order: expected {', '.join(event_types)}, "
                    f"got {_list(picked)}"
                )

    def assert_no_failures(self) -> None:
        """Assert no emission ended DROPPED, EXPIRED, FAILED or REJECTED."""
        bad = [r for r in self.final() if r.outcome in BAD_OUTCOMES - {Outcome.BUFFERED}]
        if bad:
            raise AssertionError(summary(bad, "failed"))

    def assert_no_gaps(self, thread_id: Hashable) -> None:
        """Assert the thread's delivered seqs are 1, 2, 3, ... without a hole (for each
        guard that delivered to it: every guard numbers its own emissions)."""
        by_guard: dict[int, list[int]] = {}
        for (guard_id, thread, seq), record in self._latest().items():
            if thread == thread_id and seq > 0 and record.outcome in _DELIVERED:
                by_guard.setdefault(guard_id, []).append(seq)
        for seqs in by_guard.values():
            holes = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
            if holes:
                raise AssertionError(
                    f"thread {thread_id} has gaps: seq {', '.join(map(str, holes))} not delivered"
                )

    def assert_no_duplicates(self) -> None:
        """Assert no emission was delivered twice by a guard."""
        counts: dict[_Key, int] = {}
        for key, record in self._keyed:
            if record.outcome in _DELIVERED:
                counts[key] = counts.get(key, 0) + 1
        twice = [f"thread {k[1]} seq {k[2]}" for k, n in counts.items() if n > 1]
        if twice:
            raise AssertionError(f"delivered more than once: {', '.join(twice)}")

    def clear(self) -> None:
        """Forget every record collected so far."""
        self.records.clear()
        self._keyed.clear()


_DELIVERED = frozenset({Outcome.DELIVERED, Outcome.FLUSHED})


def summary(bad: list[Emission], verb: str) -> str:
    """One summary line, then one bullet per emission."""
    noun = "emission" if len(bad) == 1 else "emissions"
    lines = [f"emitguard: {len(bad)} {noun} {verb}"]
    lines.extend(f"- {record}" for record in bad)
    return "\n".join(lines)


def _outcome(value: Outcome | str) -> Outcome:
    if isinstance(value, Outcome):
        return value
    try:
        return Outcome(str(value).lower())
    except ValueError:
        names = ", ".join(o.value for o in Outcome)
        raise ValueError(f"unknown outcome {value!r}; outcomes: {names}") from None


def _list(items: list[Any]) -> str:
    return ", ".join(map(str, items)) or "nothing"


def _dedupe(items: Iterable[str | None]) -> list[str | None]:
    seen: list[str | None] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
