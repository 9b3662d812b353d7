"""The guard's state and bookkeeping: thread slots, owners, records and state transitions."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emitguard import hooks
from emitguard._line import ThreadSlot
from emitguard._telemetry import Telemetry
from emitguard.calls import MISSING
from emitguard.errors import EmissionError
from emitguard.options import GuardOptions
from emitguard.outbox import MemoryOutbox, Outbox, OutboxEntry
from emitguard.records import Emission, event_type_of
from emitguard.states import ConnectionState, Outcome

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from emitguard.guard import Guard
    from emitguard.transport import Probe

log = logging.getLogger("emitguard")

CONNECTED = ConnectionState.CONNECTED
_DELIVERED = frozenset({Outcome.DELIVERED, Outcome.FLUSHED})
_names = itertools.count(1)
_live: weakref.WeakSet[GuardCore] = weakref.WeakSet()


def live_guards() -> list[Guard]:
    """Every guard constructed in this process that is still alive and not closed."""
    from emitguard.guard import Guard

    return [guard for guard in list(_live) if isinstance(guard, Guard) and not guard.closed]


class GuardCore:
    """State shared by the send paths and the outbox flow."""

    def __init__(
        self,
        *,
        outbox: Outbox | None = None,
        name: str | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        **options: Any,
    ):
        self.options = GuardOptions.from_kwargs(options)
        self.name = name or f"guard-{next(_names)}"
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.closed = False
        self._threads: dict[str, ThreadSlot] = {}
        self._owners: dict[object, set[str]] = {}
        self._backlogged: set[ThreadSlot] = set()
        self._counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self._seq_elsewhere = 0
        """Seqs given out by any path but a hot-path delivery that worked."""
        self._total = 0
        self._in_flight: set[tuple[str, int]] = set()
        """(thread, seq) of outbox entries whose delivery is under way."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._stamp = self.options.stamp_seq
        self._strict = self.options.strict
        self._poison = self.options.poison
        self._dispatch = hooks._dispatch
        self._hot: dict[str, ThreadSlot] = self._threads
        """The threads the hot path may serve: all of them, or none while every delivery
        needs a record, a span or a count (someone listens, seqs are stamped, telemetry)."""
        self._history = self.options.history
        self._subscribed = 0
        """Open subscriptions over all threads (deliveries are then fanned out to them)."""
        self._confirm: float | None = None
        """Seconds to wait for a transport to confirm a delivery; ``None``: no confirmation."""
        self._plain = True
        """No record needed per delivery: nobody listens, no stamping, no history and no
        subscription (the hot path and the instrumented fast path need it)."""
        self._instrumented = False
        """Spans, metrics or transport confirmation: sends go through ``_traced``."""
        self._tel = Telemetry(self, tracer_provider, meter_provider)
        hooks.load_entry_points()
        _live.add(self)
        self.refresh()
        hooks.call_safely("emitguard_guard_created", guard=self)

    def refresh(self) -> None:
        """Re-read whether anyone listens to records and whether an OpenTelemetry SDK stands
        behind the providers (called when plugins change, and on each association while no
        SDK was found). Call it after configuring OpenTelemetry to trace the very next send."""
        self._tel.refresh()
        self._replan()

    def _replan(self) -> None:
        self._plain = (
            self._stamp is None
            and not self._dispatch.listening
            and not self._history
            and not self._subscribed
        )
        self._instrumented = self._tel.active or self._confirm is not None
        self._hot = self._threads if self._plain and not self._instrumented else {}

    # --------------------------------------------------------------- threads

    def _slot(self, thread_id: str) -> ThreadSlot:
        slot = self._threads.get(thread_id)
        if slot is None:
            slot = self._threads[thread_id] = ThreadSlot(thread_id)
        return slot

    def _own(self, slot: ThreadSlot, owner: object) -> None:
        """Record that ``owner`` (a user, a connection) carries the thread."""
        key = owner_key(owner)
        slot.owners.add(key)
        self._owners.setdefault(key, set()).add(slot.thread_id)

    def _adopt(self, slot: ThreadSlot, probe: Probe) -> None:
        """The connections a confirmed delivery went through carry the thread."""
        for owner in probe.owners - slot.owners:
            self._own(slot, owner)

    def _set_state(self, slot: ThreadSlot, new: ConnectionState, note: str | None) -> None:
        slot.note = note
        old = slot.state
        if old is new:
            return
        slot.state = new
        hooks.call_safely(
            "emitguard_state_changed", guard=self, thread_id=slot.thread_id, old=old, new=new
        )

    def _unready_reason(self, slot: ThreadSlot) -> str:
        state = slot.state
        if state is ConnectionState.CONNECTING:
            if self.options.on_unready == "buffer":
                return "thread not associated yet (on_unready='buffer')"
            if slot.timed_out:
                return "thread not associated; an earlier send already waited ready_timeout"
            return "thread not associated yet"
        if state is CONNECTED:
            return "queued behind older events of the thread"
        label = "disconnected" if state is ConnectionState.DISCONNECTED else "in error"
        return f"thread {label}: {slot.note}" if slot.note else f"thread {label}"

    def _bad_input(self, thread_id: object, message: object) -> str | None:
        if thread_id is MISSING:
            return "thread_id must be a non-empty str, got nothing (the call passed no thread)"
        if not isinstance(thread_id, str):
            kind = type(thread_id).__name__
            return f"thread_id must be a non-empty str, got {kind} {thread_id!r}"
        if not thread_id:
            return "thread_id must be a non-empty str, got ''"
        if message is MISSING:
            return "the call passed no message"
        if message is None:
            return "message is None"
        return None

    def _stamped(self, message: Any, seq: int) -> Any:
        if isinstance(message, dict):
            return {**message, self._stamp: seq}
        return message

    # ------------------------------------------------------- event loops

    def _elsewhere(self, method: Callable[..., Any], *args: Any) -> bool:
        """Called from another OS thread while the guard's loop runs: run it there instead."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return False
        try:
            if asyncio.get_running_loop() is loop:
                return False
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(method, *args)
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --------------------------------------------------------------- records

    def _entry(
        self,
        slot: ThreadSlot,
        seq: int,
        message: Any,
        deliver: Callable[[Any], Any],
        is_async: bool,
        created_at: float,
        attempts: int,
        waited: float = 0.0,
    ) -> OutboxEntry:
        return OutboxEntry(
            thread_id=slot.thread_id,
            seq=seq,
            message=message,
            event_type=event_type_of(message),
            created=time.monotonic() - (time.time() - created_at),
            created_at=created_at,
            deliver=deliver,
            is_async=is_async,
            attempts=attempts,
            waited=waited,
        )

    def _record(
        self,
        outcome: Outcome,
        thread_id: str,
        seq: int,
        message: Any,
        reason: str | None = None,
        *,
        waited: float = 0.0,
        attempts: int = 0,
        created_at: float | None = None,
    ) -> Emission:
        now = time.time()
        return Emission(
            thread_id=thread_id,
            seq=seq,
            event_type=event_type_of(message),
            outcome=outcome,
            reason=reason,
            waited=waited,
            attempts=attempts,
            created_at=now if created_at is None else created_at,
            recorded_at=now,
            guard_name=self.name,
            message=None if message is MISSING else message,
        )

    def _entry_record(
        self, entry: OutboxEntry, outcome: Outcome, reason: str | None = None
    ) -> Emission:
        in_outbox = time.monotonic() - entry.buffered if entry.buffered else 0.0
        return Emission(
            thread_id=entry.thread_id,
            seq=entry.seq,
            event_type=entry.event_type,
            outcome=outcome,
            reason=reason,
            waited=entry.waited,
            buffered_for=in_outbox if outcome is not Outcome.BUFFERED else 0.0,
            attempts=entry.attempts,
            created_at=entry.created_at,
            recorded_at=time.time(),
            guard_name=self.name,
            message=entry.message,
        )

    def _note(self, record: Emission) -> Emission:
        """Count a record and hand it to the listeners."""
        self._counts[record.outcome] += 1
        if self._history and record.outcome in _DELIVERED and record.seq:
            slot = self._threads.get(record.thread_id)
            if slot is not None:
                slot.remember(record.seq, record.message, self._history)
        if self._tel.active:
            self._tel.noted(record)
        if self._dispatch.listening:
            hooks.call_safely("emitguard_emission", emission=record, guard=self)
        return record

    def _conclude(self, record: Emission) -> bool:
        """Note the caller's own record; True for a good outcome, else False (or raise)."""
        self._note(record)
        if self._tel.active:
            self._tel.concluded(record)
        if record.outcome.ok:
            return True
        if self._strict:
            raise EmissionError(record)
        return False

    def _fault(self, thread_id: object, message: Any, exc: Exception) -> bool:
        """emitguard's own fault: logged and recorded, never raised (but in strict mode)."""
        log.exception("emitguard internal error while sending to thread %r", thread_id)
        reason = f"emitguard internal error: {type(exc).__name__}: {exc}"
        return self._conclude(
            self._record(Outcome.FAILED, thread_name(thread_id), 0, message, reason)
        )


def thread_name(thread_id: object) -> str:
    """A thread id for a record, even when the id given was not a str."""
    if thread_id is MISSING:
        return "<missing>"
    return thread_id if isinstance(thread_id, str) else repr(thread_id)


def check_thread_id(thread_id: object) -> None:
    """Raise :class:`ValueError` unless ``thread_id`` is a non-empty str."""
    if not isinstance(thread_id, str) or not thread_id:
        raise ValueError(f"thread_id must be a non-empty str, got {thread_id!r}")


def owner_key(owner: object) -> object:
    """A dictionary key for an owner, also for unhashable ones (keyed by identity)."""
    try:
        hash(owner)
    except TypeError:
        return ("unhashable owner", id(owner))
    return owner
