"""Emission records: what listeners, reports and the pytest plugin see."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable
from typing import Any

from emitguard.states import Outcome

__all__ = ["Emission", "event_reader", "event_type_of", "make_emission"]


@dataclasses.dataclass(frozen=True, slots=True)
class Emission:
    """One recorded step in the life of an emission.

    An emission that goes straight through yields one record (``DELIVERED``); one that waits
    in the outbox yields a ``BUFFERED`` record and later a terminal one for the same
    ``thread_id`` and ``seq``.
    """

    thread_id: Hashable
    """The destination thread, as it was given (``str``, ``int``, ``UUID``, ...); for a
    ``REJECTED`` bad id, its ``repr``; ``None`` for a ``PASSED`` send that named none."""
    seq: int
    """Per-thread sequence number, 1, 2, 3, ... in call order; 0 for an emission outside
    the thread's order (rejected before sequencing, passed through, or sent from inside
    the association call)."""
    event_type: str | None
    """The event type: the message's ``type`` field by default (see the ``event_type``
    option)."""
    outcome: Outcome
    reason: str | None = None
    """Why; set for every outcome but ``DELIVERED``."""
    waited: float = 0.0
    """Seconds the readiness barrier held the emission."""
    buffered_for: float = 0.0
    """Seconds the emission spent in the outbox (for outcomes after ``BUFFERED``)."""
    attempts: int = 0
    """How many times the original send was called for it."""
    created_at: float = 0.0
    """Wall-clock time (``time.time()``) of the send call."""
    recorded_at: float = 0.0
    """Wall-clock time of this record."""
    guard_name: str = ""
    """Name of the guard that recorded it."""
    message: Any = dataclasses.field(default=None, repr=False, compare=False)
    """The message as handed to the original send (after seq stamping)."""

    @property
    def terminal(self) -> bool:
        """True unless the emission is still buffered."""
        return self.outcome is not Outcome.BUFFERED

    def __str__(self) -> str:
        kind = self.event_type or "message"
        text = f"thread {self.thread_id} seq {self.seq} {kind}: {self.outcome.name}"
        return f"{text} ({self.reason})" if self.reason else text


def _maker() -> Callable[..., Emission]:
    """A constructor of :class:`Emission` that sets each slot directly instead of through the
    frozen dataclass's ``object.__setattr__`` (half the cost: the guard makes one record per
    observed send)."""
    fields = [field.name for field in dataclasses.fields(Emission)]
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11) = (
        getattr(Emission, name).__set__ for name in fields
    )
    new = object.__new__

    def make(
        thread_id: Any,
        seq: int,
        event_type: str | None,
        outcome: Outcome,
        reason: str | None,
        waited: float,
        buffered_for: float,
        attempts: int,
        created_at: float,
        recorded_at: float,
        guard_name: str,
        message: Any,
    ) -> Emission:
        record: Emission = new(Emission)
        s0(record, thread_id)
        s1(record, seq)
        s2(record, event_type)
        s3(record, outcome)
        s4(record, reason)
        s5(record, waited)
        s6(record, buffered_for)
        s7(record, attempts)
        s8(record, created_at)
        s9(record, recorded_at)
        s10(record, guard_name)
        s11(record, message)
        return record

    return make


make_emission = _maker()
"""``make_emission(thread_id, seq, event_type, outcome, reason, waited, buffered_for,
attempts, created_at, recorded_at, guard_name, message)``: every field, in order."""


def event_type_of(message: Any) -> str | None:
    """The ``type`` of a message: a mapping's ``"type"`` key or a ``type`` attribute."""
    if isinstance(message, dict):
        value = message.get("type")
    else:
        value = getattr(message, "type", None)
    return value if isinstance(value, str) else None


def event_reader(custom: Callable[[Any], str | None] | None) -> Callable[[Any], str | None]:
    """The event-type reader of a guard: ``custom(message)`` (the ``event_type`` option) made
    safe, or :func:`event_type_of`."""
    if custom is None:
        return event_type_of
    reader = custom
    failed = False

    def read(message: Any) -> str | None:
        nonlocal failed
        try:
            value = reader(message)
        except Exception:
            level = logging.DEBUG if failed else logging.WARNING
            failed = True
            logging.getLogger("emitguard").log(
                level, "emitguard event_type %r raised; type unknown", reader, exc_info=True
            )
            return None
        return value if isinstance(value, str) else None

    return read
