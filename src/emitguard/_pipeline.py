"""The send pipeline: every guarded send, from the call to its outcome.

One path decides what happens to an emission: :meth:`Pipeline.send` (async) and
:meth:`Pipeline.send_sync`. A send to a CONNECTED thread whose line is free and that nobody
needs a record of takes a *fast path* (:mod:`emitguard._senders`): the same steps without the
record, and on any failure or cancellation it hands over to :meth:`Pipeline.failed_fast`, the
very code the general path runs in that case. So whether a listener, a span, a stamp or a
confirmation is active never changes what happens to an event.

The rule for cancellation: a sender cancelled at any point keeps its event (it is buffered,
in its place in the thread's order) and says nothing about the connection: the thread keeps
its state. An event cancelled during the send itself may have been delivered already; it is
sent again (at least once; ``stamp_seq`` lets clients drop the duplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emitguard import transport
from emitguard._delivery import Delivery
from emitguard._flow import Flow
from emitguard._ids import id_problem, names_no_thread
from emitguard._loops import alive, running_loop
from emitguard._recorder import Recorder, thread_name
from emitguard._slot import ThreadSlot, Ticket
from emitguard._table import ThreadTable
from emitguard._telemetry import Telemetry
from emitguard.calls import MISSING, Call, Verdict, judge
from emitguard.errors import EmissionError
from emitguard.options import GuardOptions, stamped
from emitguard.outbox import OutboxEntry, drive
from emitguard.states import ConnectionState, Outcome

if TYPE_CHECKING:
    from emitguard._relay import Relay

__all__ = ["PASSED_REASON", "Pipeline", "problem"]

log = logging.getLogger("emitguard")

CONNECTED = ConnectionState.CONNECTED
CONNECTING = ConnectionState.CONNECTING


@dataclass(frozen=True, slots=True)
class _Pending:
    """A send waiting for its turn in line: what to keep if its sender is gone by then."""

    message: Any
    call: Call
    created_at: float
    is_async: bool
    outcome: list[bool] = field(default_factory=list)
    """What a synchronous send's delivery in its turn returned, once it ran."""


class Pipeline:
    """Sends of one guard."""

    def __init__(
        self,
        options: GuardOptions,
        table: ThreadTable,
        recorder: Recorder,
        flow: Flow,
        delivery: Delivery,
        telemetry: Telemetry,
    ) -> None:
        self.options = options
        self._table = table
        self.recorder = recorder
        self.flow = flow
        self.delivery = delivery
        self.tel = telemetry
        self._stamp = options.stamp_seq
        self.fast: dict[Any, ThreadSlot] = table.slots
        """The threads the plain fast path may serve: all of them, or none while anything
        observes the sends, a delivery needs more than the call, or the guard is closed."""
        self.plain = True
        """A delivery needs nothing but the call: no stamp, no replay window, no
        subscription (the plain fast path may serve)."""
        self.direct = True
        """A delivery needs the call, and at most a seq stamp and the replay window: no
        subscription, no shared log (the observed fast path may serve)."""
        self.lean: dict[Any, ThreadSlot] = table.slots
        """The threads an adapter's send (``send_call``) may deliver on the lean path: the
        plain path and, if kept, the replay window; empty while a stamp, a listener,
        telemetry, transport confirmation, a subscription or a shared log needs more, or the
        guard is closed."""
        self.behind = False
        """A confirmed send whose transport tags it may be confirmed behind, several of a
        thread in flight at once (:mod:`emitguard._inflight`)."""
        self.observed = False
        """Sends take the observed fast path: a listener, telemetry or transport confirmation
        wants to see them, or a stamp or the replay window, which the plain path skips."""
        self.window = recorder.window
        self.listening = False
        """Someone listens to records: the observed fast path makes one per delivery."""
        self.closed = False
        self._warned_closed = False
        self.relay: Relay | None = None
        """Set with a shared backend: every send goes through the thread's shared log."""
        self.probe: Callable[[], None] | None = None
        """Set while the guard is instrumented but has no SDK yet: called before each send
        (the plain fast path is off meanwhile), it looks for one."""

    def plan(
        self, *, subscribed: bool, listening: bool, instrumented: bool, closed: bool
    ) -> None:
        """Choose the fast path that fits what is attached to the guard now."""
        self.direct = not subscribed and self.relay is None
        self.plain = self.direct and self._stamp is None and self.window is None
        self.listening = listening
        self.observed = listening or instrumented or (self.direct and not self.plain)
        self.closed = closed
        self.behind = (
            self.direct
            and not closed
            and self.delivery.confirm is not None
            and not self.options.strict
            and self.flow.outbox.synchronous
        )
        self.fast = self._table.slots if self.plain and not self.observed and not closed else {}
        lean = self.direct and self._stamp is None and not (listening or instrumented or closed)
        self.lean = self._table.slots if lean else {}

    def delivered_fast(
        self, slot: ThreadSlot, seq: int, message: Any, created_at: float, kind: str | None
    ) -> None:
        """A delivery on the observed fast path worked: its record, for the listeners."""
        self.recorder.delivered(slot.thread_id, seq, message, created_at, kind)

    # ------------------------------------------------------------------ async

    async def send(self, thread_id: Any, message: Any, call: Call) -> bool:
        """The general path, with emitguard's own faults recorded, not raised (but the
        :class:`EmissionError` of strict mode)."""
        try:
            return await self._send(thread_id, message, call)
        except EmissionError:
            raise
        except Exception as exc:
            return self.recorder.fault(thread_id, message, exc)

    async def _send(self, thread_id: Any, message: Any, call: Call) -> bool:
        if self.closed:
            return await self._unguarded(thread_id, message, call)
        if names_no_thread(thread_id):
            return await self.passed(message, call)  # type: ignore[no-any-return]
        bad = problem(thread_id, message, call.kind)
        if bad is not None:
            record = self.recorder.make(
                Outcome.REJECTED, thread_name(thread_id), 0, message, bad, kind=call.kind
            )
            return self.recorder.conclude(record)
        if transport.associating(thread_id):
            return await self._greet(thread_id, message, call, True)
        self.flow.home = asyncio.get_running_loop()
        if self.relay is not None:  # a shared backend: the log gives the seq and delivers
            if not isinstance(thread_id, str):  # the log is keyed by the id's text
                why = "a shared (Redis) outbox keys threads by str; got " + repr(thread_id)
                record = self.recorder.make(Outcome.REJECTED, thread_id, 0, message, why)
                return self.recorder.conclude(record)
            return await self.relay.send(thread_id, message, call)
        created_at = time.time()
        slot, ticket = self._table.take(thread_id, _Pending(message, call, created_at, True))
        if ticket is not None:
            await self._wait_turn(slot, ticket)
        closing = False
        try:
            return await self._in_line(slot, message, call, created_at)
        except GeneratorExit:
            closing = True
            raise
        finally:
            self.flow.leave(slot, closing)

    async def _wait_turn(self, slot: ThreadSlot, ticket: Ticket) -> None:
        future = ticket.future
        assert future is not None
        try:
            await future
        except asyncio.CancelledError:
            granted = future.done() and not future.cancelled()  # our turn came as we were
            if granted and self.keep(slot, ticket):  # cancelled: keep the event ourselves
                self.flow.leave(slot)
            raise  # else the ticket keeps our place: its keep work runs in our turn

    async def _in_line(self, slot: ThreadSlot, message: Any, call: Call, created_at: float) -> bool:
        """Deliver or buffer one emission; the caller holds the thread's line.

        Cancelled at any await, the emission is kept in the outbox before the cancellation
        goes on.
        """
        seq = self._next_seq(slot)
        if self._stamp is not None:
            message = self.stamped(message, seq)
        waited, attempts = 0.0, 0
        stage: str | None = "while waiting for the thread"
        flow = self.flow
        try:
            reason = self._unready_reason(slot)
            if self._waits(slot):
                waited = await self._barrier(slot)
                if slot.state is CONNECTING:
                    slot.timed_out = True
                    reason = (
                        f"thread not associated within ready_timeout={self.options.ready_timeout}s"
                    )
                else:
                    reason = self._unready_reason(slot)
            if slot.flight:  # nothing overtakes a send still waiting for its confirmation
                stage = "while older events of the thread were confirmed"
                await slot.flight.settled()
                reason = self._unready_reason(slot)
            if slot.state is CONNECTED and slot.backlog and not flow.retrying(slot):
                stage = "while older events of the thread were flushed"
                await flow.flush_in_line(slot, upto=seq)
                reason = self._unready_reason(slot)
            if slot.state is CONNECTED and not slot.backlog:
                stage, attempts = "during send", 1
                verdict, why = await self.delivery.attempt(call, message, True, slot, seq)
                stage = None
                return await self._judged(
                    slot, seq, message, call, created_at, verdict, why, waited=waited
                )
            stage = None
            entry = flow.entry(slot, seq, message, call, True, created_at, 0, waited)
            return await flow.buffer(slot, entry, reason)
        except asyncio.CancelledError:
            if stage is not None:
                entry = flow.entry(slot, seq, message, call, True, created_at, attempts, waited)
                await self._keep(slot, entry, f"sender cancelled {stage}")
            raise

    def _waits(self, slot: ThreadSlot) -> bool:
        opts = self.options
        return (
            slot.state is CONNECTING
            and opts.on_unready == "wait"
            and not slot.timed_out
            and opts.ready_timeout > 0
        )

    async def _barrier(self, slot: ThreadSlot) -> float:
        """Wait (holding the line) for the association; the seconds waited."""
        started = time.monotonic()
        slot.parked += 1  # holding the line, waiting for the association: see Guard.hold
        try:
            await self.wait_ready(slot, self.options.ready_timeout, holds_line=True)
            while slot.gate is not None:  # a hold stepped ahead of us: let it finish
                await slot.gate.wait(0.05)
        finally:
            slot.parked -= 1
        return time.monotonic() - started

    async def wait_ready(
        self, slot: ThreadSlot, timeout: float, *, holds_line: bool = False
    ) -> None:
        """Wait for the thread's association (one future, one timer: a wake is one hop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiter = (future, holds_line)
        slot.ready.append(waiter)
        timer = loop.call_later(timeout, _give_up, future)
        try:
            await future
        finally:
            timer.cancel()
            if waiter in slot.ready:
                slot.ready.remove(waiter)

    async def _judged(
        self,
        slot: ThreadSlot,
        seq: int,
        message: Any,
        call: Call,
        created_at: float,
        verdict: Verdict,
        why: str | None,
        *,
        waited: float = 0.0,
        is_async: bool = True,
    ) -> bool:
        """What a delivery's verdict means for the emission (every path decides here)."""
        recorder = self.recorder
        if verdict is Verdict.OK:
            self.flow.delivered(slot)
            record = recorder.make(
                Outcome.DELIVERED,
                slot.thread_id,
                seq,
                message,
                waited=waited,
                attempts=1,
                created_at=created_at,
                kind=call.kind,
            )
            return recorder.conclude(record)
        entry = self.flow.entry(slot, seq, message, call, is_async, created_at, 1, waited)
        if verdict is Verdict.POISON:
            return recorder.conclude(recorder.of_entry(entry, Outcome.FAILED, why))
        return await self.flow.buffer(slot, entry, self.flow.failed(slot, why or ""))

    async def failed_fast(
        self,
        slot: ThreadSlot,
        seq: int,
        message: Any,
        call: Call,
        verdict: Verdict,
        why: str | None,
        *,
        cancelled: bool = False,
    ) -> bool:
        """A fast-path delivery did not work (or its sender was cancelled): decide as the
        general path does, then leave the line."""
        slot.seq = seq
        self.recorder.seq_recorded()
        try:
            if self._stamp is not None:
                message = self.stamped(message, seq)
            if cancelled:
                entry = self.flow.entry(slot, seq, message, call, True, time.time(), 1)
                await self._keep(slot, entry, "sender cancelled during send")
                return False
            return await self._judged(slot, seq, message, call, time.time(), verdict, why)
        except EmissionError:
            raise
        except Exception as exc:
            return self.recorder.fault(slot.thread_id, message, exc)
        finally:
            self.flow.leave(slot)

    async def _keep(self, slot: ThreadSlot, entry: OutboxEntry, reason: str) -> None:
        """Buffer the event of a sender being cancelled; the cancellation wins over strict."""
        with contextlib.suppress(EmissionError):  # recorded; no caller is left to raise to
            await self.flow.buffer(slot, entry, reason)

    def keep(self, slot: ThreadSlot, ticket: Ticket) -> bool:
        """In a gone waiter's turn (the caller holds the line): deliver a synchronous send's
        event, or keep a cancelled async sender's. True when done here; False when a task took
        the line over to finish (it releases it)."""
        pending: _Pending = ticket.keep
        if not pending.is_async:
            result = self._sync_in_line(slot, pending.message, pending.call, pending.created_at)
            pending.outcome.append(result)
            return True
        seq = self._next_seq(slot)
        message = self.stamped(pending.message, seq) if self._stamp else pending.message
        entry = self.flow.entry(slot, seq, message, pending.call, True, pending.created_at, 0)
        future = ticket.future
        if future is not None and entry.loop is None:
            entry.loop = future.get_loop()
        reason = "sender cancelled while waiting for its turn"
        if self.flow.outbox.synchronous:
            drive(self._keep(slot, entry, reason))
            return True
        loop = running_loop() or (entry.loop if alive(entry.loop) else None)
        if loop is None:
            why = f"{reason}; no event loop left to keep it in a {self.flow.outbox!r}"
            self.recorder.note(self.recorder.of_entry(entry, Outcome.FAILED, why))
            return True

        async def keep_then_leave() -> None:
            try:
                await self._keep(slot, entry, reason)
            finally:
                self.flow.leave(slot)

        loop.call_soon_threadsafe(self.flow.spawn, keep_then_leave())
        return False

    # ------------------------------------------------------------------- sync

    def send_sync(self, thread_id: Any, message: Any, call: Call) -> bool:
        """A synchronous send: delivers or buffers at once, never waits. When another
        sender holds the thread's line, the event is delivered in its turn by whoever hands
        the line on, and this returns True (accepted)."""
        try:
            return self._send_sync(thread_id, message, call)
        except EmissionError:
            raise
        except Exception as exc:
            return self.recorder.fault(thread_id, message, exc)

    def _send_sync(self, thread_id: Any, message: Any, call: Call) -> bool:
        recorder = self.recorder
        if self.closed:
            return self._unguarded_sync(thread_id, message, call)
        if names_no_thread(thread_id):
            return self.passed_sync(message, call)  # type: ignore[no-any-return]
        bad = problem(thread_id, message, call.kind)
        if bad is not None:
            return recorder.conclude(
                recorder.make(
                    Outcome.REJECTED, thread_name(thread_id), 0, message, bad, kind=call.kind
                )
            )
        if transport.associating(thread_id):
            judged: bool = drive(self._greet(thread_id, message, call, False))
            return judged
        outbox = self.flow.outbox
        if not outbox.synchronous:
            reason = f"a synchronous send needs a synchronous outbox; {outbox!r} is not"
            return recorder.conclude(
                recorder.make(Outcome.REJECTED, thread_id, 0, message, reason, kind=call.kind)
            )
        created_at = time.time()
        pending = _Pending(message, call, created_at, False)
        slot, ticket = self._table.take(thread_id, pending, wait=False)
        if ticket is not None:  # accepted; or, if its turn came at once, what it came to
            return pending.outcome[0] if pending.outcome else True
        try:
            return self._sync_in_line(slot, message, call, created_at)
        finally:
            self.flow.leave(slot)

    def _sync_in_line(self, slot: ThreadSlot, message: Any, call: Call, created_at: float) -> bool:
        seq = self._next_seq(slot)
        if self._stamp is not None:
            message = self.stamped(message, seq)
        if slot.state is CONNECTED and not slot.backlog and not slot.flight:
            verdict, why = drive(self.delivery.attempt(call, message, False, slot, seq))
            judged: bool = drive(
                self._judged(slot, seq, message, call, created_at, verdict, why, is_async=False)
            )
            return judged
        entry = self.flow.entry(slot, seq, message, call, False, created_at, 0)
        return self.flow.buffer_now(slot, entry, self._unready_reason(slot))

    # ------------------------------------------------- outside the thread's order

    async def passed(self, message: Any, call: Call) -> Any:
        """A send naming no thread (a broadcast): the original is called exactly as it was,
        its result returned and its exceptions raised unchanged; recorded as PASSED."""
        try:
            return await call.fn(*call.args, **call.kwargs)
        finally:
            self._note_passed(message, call)

    def passed_sync(self, message: Any, call: Call) -> Any:
        """:meth:`passed` for a synchronous original."""
        try:
            return call.fn(*call.args, **call.kwargs)
        finally:
            self._note_passed(message, call)

    def _note_passed(self, message: Any, call: Call) -> None:
        recorder = self.recorder
        recorder.note(
            recorder.make(
                Outcome.PASSED, None, 0, message, PASSED_REASON, attempts=1, kind=call.kind
            )
        )

    async def _greet(self, thread_id: Any, message: Any, call: Call, is_async: bool) -> bool:
        """A send made inside the association call of its own thread (the manager greeting
        the connection it associates): delivered at once, outside the thread's line and
        order (``seq`` 0, not stamped), never waiting on the barrier that very call is about
        to open. A failed greeting is FAILED, not kept: its connection is the one that
        failed."""
        slot = self._table.slot(thread_id)
        created_at = time.time()
        verdict, why = await self.delivery.attempt(call, message, is_async, slot, 0)
        recorder = self.recorder
        if verdict is Verdict.OK:
            outcome, reason = Outcome.DELIVERED, None
        else:
            outcome, reason = Outcome.FAILED, f"{why}; {GREETING_FAILED}"
        record = recorder.make(
            outcome,
            thread_id,
            0,
            message,
            reason,
            attempts=1,
            created_at=created_at,
            kind=call.kind,
        )
        accepted = recorder.conclude(record)
        self._table.settled(slot)
        return accepted

    # ------------------------------------------------------------- closed

    def _closed_note(self) -> str:
        if not self._warned_closed:
            self._warned_closed = True
            log.warning("emitguard guard is closed: sends go to the original send unguarded")
        return "guard closed: handed to the original send unguarded"

    async def _unguarded(self, thread_id: Any, message: Any, call: Call) -> bool:
        result = await call(message)
        return self._record_unguarded(thread_id, message, call, result)

    def _unguarded_sync(self, thread_id: Any, message: Any, call: Call) -> bool:
        return self._record_unguarded(thread_id, message, call, call(message))

    def _record_unguarded(self, thread_id: Any, message: Any, call: Call, result: Any) -> bool:
        verdict, why = judge(result, self.delivery.accept)
        outcome = Outcome.DELIVERED if verdict is Verdict.OK else Outcome.FAILED
        note = self._closed_note()
        reason = note if why is None else f"{note}; {why}"
        record = self.recorder.make(
            outcome, thread_name(thread_id), 0, message, reason, kind=call.kind
        )
        self.recorder.note(record)
        return verdict is Verdict.OK

    # ------------------------------------------------------------ helpers

    def _next_seq(self, slot: ThreadSlot) -> int:
        """The next seq of the thread, for an emission that gets a record."""
        slot.seq += 1
        self.recorder.seq_recorded()
        return slot.seq

    @property
    def stamps(self) -> bool:
        """Messages carry their seq (option ``stamp_seq``)."""
        return self._stamp is not None

    def stamped(self, message: Any, seq: int) -> Any:
        """The message with its seq stamped in (option ``stamp_seq``), or as it is."""
        return stamped(self._stamp, message, seq)

    def _unready_reason(self, slot: ThreadSlot) -> str:
        state = slot.state
        if state is CONNECTING:
            if self.options.on_unready == "buffer":
                return "thread not associated yet (on_unready='buffer')"
            if slot.timed_out:
                return "thread not associated; an earlier send already waited ready_timeout"
            return "thread not associated yet"
        if state is CONNECTED:
            if self.flow.retrying(slot):
                return "queued behind an event whose delivery is being retried"
            if slot.flight:
                return "queued behind older events of the thread still being confirmed"
            return "queued behind older events of the thread"
        label = "disconnected" if state is ConnectionState.DISCONNECTED else "in error"
        return f"thread {label}: {slot.note}" if slot.note else f"thread {label}"


def problem(thread_id: object, message: object, kind: str | None = None) -> str | None:
    """Why a send cannot be taken (it is REJECTED with this reason), or ``None``. (A send
    naming no thread at all is not a problem: it passes through, see
    :func:`emitguard._ids.names_no_thread`.) A call that names its event type apart
    (``kind``) may carry no data: ``emit("done", to=room)``."""
    bad = id_problem(thread_id)
    if bad is not None:
        return bad
    if message is MISSING:
        return "the call passed no message"
    if message is None and kind is None:
        return "message is None"
    return None


PASSED_REASON = "the send names no thread (a broadcast): handed to the original send unchanged"
GREETING_FAILED = (
    "sent from inside the association call of its thread (to the connection being "
    "associated), and that delivery failed: not kept"
)


def _give_up(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)
