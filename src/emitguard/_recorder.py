"""The recorder: makes each emission's records, counts them, and tells everyone who listens.

Listeners (the ``emitguard_emission`` hook), telemetry and the replay window all learn of a
record here, and only here. Counts are cumulative: they survive the threads they counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from emitguard import hooks
from emitguard._history import ReplayWindow
from emitguard._ids import shown
from emitguard._telemetry import Telemetry
from emitguard.calls import MISSING
from emitguard.errors import EmissionError
from emitguard.outbox import OutboxEntry
from emitguard.records import Emission, make_emission
from emitguard.states import Outcome

__all__ = ["Recorder", "thread_name"]

log = logging.getLogger("emitguard")

_DELIVERED = frozenset({Outcome.DELIVERED, Outcome.FLUSHED})
_WARNED_LIMIT = 1000
"""Threads remembered as warned about (the oldest is forgotten past it)."""


class Recorder:
    """Records of one guard: made, counted, handed to listeners, telemetry and the window.

    ``guard`` is the :class:`~emitguard.Guard` the records are of (its ``name``; listeners
    get it as the hook's ``guard`` argument)."""

    def __init__(
        self,
        guard: Any,
        telemetry: Telemetry,
        window: ReplayWindow | None,
        *,
        strict: bool,
    ) -> None:
        self._guard = guard
        self.type_of = telemetry.type_of
        """The guard's event-type reader (the ``event_type`` option)."""
        self._warned: OrderedDict[tuple[str, Any], None] = OrderedDict()
        self._tel = telemetry
        self.window = window
        """The replay window that delivered records feed (``None``: no ``history``)."""
        self._strict = strict
        self._lock = threading.Lock()
        self.counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        """Records made, by outcome."""
        self.recorded_seqs = 0
        """Seqs given to emissions that get records (all but the deliveries of the plain
        fast path, which are counted from the seq numbers instead)."""

    @property
    def guard_name(self) -> str:
        """The name of the guard whose records these are."""
        name: str = self._guard.name
        return name

    def make(
        self,
        outcome: Outcome,
        thread_id: Any,
        seq: int,
        message: Any,
        reason: str | None = None,
        *,
        waited: float = 0.0,
        attempts: int = 0,
        created_at: float | None = None,
        kind: str | None = None,
    ) -> Emission:
        """A record of an emission that has no outbox entry (``kind``: its event type, when
        the call named it apart from the message)."""
        now = time.time()
        return make_emission(
            thread_id,
            seq,
            kind if kind is not None else self.type_of(message),
            outcome,
            reason,
            waited,
            0.0,
            attempts,
            now if created_at is None else created_at,
            now,
            self._guard.name,
            None if message is MISSING else message,
        )

    def of_entry(self, entry: OutboxEntry, outcome: Outcome, reason: str | None) -> Emission:
        """A record of an emission that has an outbox entry."""
        in_outbox = time.monotonic() - entry.buffered if entry.buffered else 0.0
        return make_emission(
            entry.thread_id,
            entry.seq,
            entry.event_type,
            outcome,
            reason,
            entry.waited,
            in_outbox if outcome is not Outcome.BUFFERED else 0.0,
            entry.attempts,
            entry.created_at,
            time.time(),
            self._guard.name,
            entry.message,
        )

    def note(self, record: Emission) -> Emission:
        """Count a record and hand it to the window, telemetry and the listeners."""
        with self._lock:
            self.counts[record.outcome] += 1
        if record.outcome is Outcome.REJECTED:
            self.warn_once("rejected", record.thread_id, "emitguard rejected %s", record)
        if self.window is not None and record.outcome in _DELIVERED and record.seq:
            self.window.remember(record.thread_id, record.seq, record.message)
        if self._tel.active:
            self._tel.noted(record)
        if hooks.listening():
            hooks.emitted(record, self._guard)
        return record

    def delivered(
        self, thread_id: Any, seq: int, message: Any, created_at: float, kind: str | None = None
    ) -> None:
        """The record of a delivery on the observed fast path (its seq not counted yet):
        :meth:`make` and :meth:`conclude` for the one outcome that needs no verdict."""
        now = time.time()
        record = make_emission(
            thread_id,
            seq,
            kind if kind is not None else self.type_of(message),
            Outcome.DELIVERED,
            None,
            0.0,
            0.0,
            1,
            created_at,
            now,
            self._guard.name,
            message,
        )
        with self._lock:
            self.counts[Outcome.DELIVERED] += 1
            self.recorded_seqs += 1
        if self.window is not None:
            self.window.remember(thread_id, seq, message)
        if self._tel.active:
            self._tel.noted(record)
        hooks.emitted(record, self._guard)

    def warn_once(self, topic: str, thread_id: Any, text: str, *args: Any) -> None:
        """Log at WARNING, once per thread and topic (a bounded memory of who was warned)."""
        try:
            key = (topic, thread_id)
            hash(key)
        except TypeError:
            key = (topic, repr(thread_id))
        with self._lock:
            if key in self._warned:
                return
            self._warned[key] = None
            if len(self._warned) > _WARNED_LIMIT:
                self._warned.popitem(last=False)
        log.warning(text, *args)

    def seq_recorded(self) -> None:
        """One more seq whose emission gets records."""
        with self._lock:
            self.recorded_seqs += 1

    def conclude(self, record: Emission) -> bool:
        """Note the caller's own record; True for a good outcome, else False (or raise in
        strict mode)."""
        self.note(record)
        if self._tel.active:
            self._tel.concluded(record)
        if record.outcome.ok:
            return True
        if self._strict:
            raise EmissionError(record)
        return False

    def fault(self, thread_id: Any, message: Any, exc: BaseException) -> bool:
        """emitguard's own fault: logged and recorded, never raised (but in strict mode)."""
        log.error("emitguard internal error while sending to thread %r", thread_id, exc_info=exc)
        reason = f"emitguard internal error: {type(exc).__name__}: {exc}"
        return self.conclude(self.make(Outcome.FAILED, thread_name(thread_id), 0, message, reason))


thread_name = shown
"""A thread id for a record, even when the id given was not a usable one."""
