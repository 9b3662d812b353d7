"""The engine: readiness barrier, ordered outbox and recorded outcomes for one process.

A :class:`Guard` knows nothing of web frameworks. Adapters hand it each send (see
:meth:`Guard.sender`, :meth:`Guard.send`) and tell it when a thread is associated or loses its
connection (:meth:`Guard.mark_connected`, ...). See ``docs/concepts.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emitguard import transport
from emitguard._core import CONNECTED, check_thread_id, live_guards, owner_key, thread_name
from emitguard._flow import OutboxFlow
from emitguard._hotpath import make_sender, make_sync_sender
from emitguard._line import ThreadSlot
from emitguard._traced import traced_send, traced_send_sync
from emitguard.calls import Arg, Call, Rebind, Verdict, WraptWrapper, rebind_only
from emitguard.errors import EmissionError
from emitguard.outbox import OutboxEntry, drive
from emitguard.states import ConnectionState, Outcome
from emitguard.stats import GuardStats
from emitguard.subscriptions import Subscription

if TYPE_CHECKING:
    pass

__all__ = ["GUARD_ARGUMENTS", "Guard", "GuardStats", "Replay", "live_guards"]

GUARD_ARGUMENTS = ("outbox", "name", "tracer_provider", "meter_provider")
"""Arguments of :class:`Guard` that are not :class:`~emitguard.options.GuardOptions`."""


@dataclass(frozen=True)
class Replay:
    """What :meth:`Guard.replay` found for a reconnecting client."""

    messages: list[tuple[int, Any]]
    """The (seq, message) pairs delivered after the client's last seq, oldest first."""
    complete: bool
    """False when the window no longer holds everything the client missed (or the client
    claims a seq the guard never gave): the client must resynchronise."""
    latest: int
    """The thread's latest seq."""


AsyncDeliver = Callable[[Any], Awaitable[Any]]
SyncDeliver = Callable[[Any], Any]
_NO_KWARGS: dict[str, Any] = {}


class Guard(OutboxFlow):
    """Guards the sends of one connection manager.

    ``Guard(**options)`` takes the options of :class:`~emitguard.options.GuardOptions`, plus
    ``outbox`` (a backend; default :class:`~emitguard.outbox.MemoryOutbox`), ``name``, and
    the OpenTelemetry ``tracer_provider`` and ``meter_provider`` (the global ones by default;
    see ``docs/tracing.md``). Most users get a guard from :func:`emitguard.guard` rather than
    building one.
    """

    def __repr__(self) -> str:
        return f"<Guard {self.name} threads={len(self._threads)} pending={self._total}>"

    # ------------------------------------------------------------------ sends

    def send(
        self, thread_id: str, message: Any, deliver: AsyncDeliver
    ) -> Coroutine[Any, Any, bool]:
        """Emit ``message`` to ``thread_id`` through ``deliver(message)``, the original async
        send (returns a coroutine to await).

        The coroutine returns True when the message was delivered or accepted into the outbox,
        False when it was rejected, dropped or failed (in strict mode those raise
        :class:`EmissionError`).
        """
        return self.send_call(thread_id, message, deliver, (message,), _NO_KWARGS, rebind_only)

    def sender(self, thread: Arg, message: Arg) -> WraptWrapper:
        """A wrapt wrapper ``(wrapped, instance, args, kwargs)`` that guards an async send
        whose thread and message arguments sit at ``thread`` and ``message``: the hot path."""
        return make_sender(self, thread, message)

    def sync_sender(self, thread: Arg, message: Arg) -> WraptWrapper:
        """:meth:`sender` for a synchronous send (it never waits on the barrier)."""
        return make_sync_sender(self, thread, message)

    async def send_call(
        self,
        thread_id: str,
        message: Any,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
    ) -> bool:
        """:meth:`send` for adapters: the original is ``fn(*args, **kwargs)``, and
        ``rebind(args, kwargs, message)`` returns the arguments with another message in them
        (for seq stamping and for deliveries from the outbox)."""
        if self._instrumented:
            return await traced_send(self, thread_id, message, fn, args, kwargs, rebind)
        return await self._send_guarded(thread_id, message, Call(fn, args, kwargs, rebind))

    async def _send_guarded(self, thread_id: Any, message: Any, call: Call) -> bool:
        """The general path, with emitguard's own faults recorded, not raised (but the
        :class:`EmissionError` of strict mode)."""
        try:
            return await self._send_slow(thread_id, message, call)
        except EmissionError:
            raise
        except Exception as exc:
            return self._fault(thread_id, message, exc)

    def send_sync(self, thread_id: str, message: Any, deliver: SyncDeliver) -> bool:
        """Like :meth:`send` for a synchronous original; never waits on the barrier."""
        return self.send_sync_call(thread_id, message, deliver, (message,), _NO_KWARGS, rebind_only)

    def send_sync_call(
        self,
        thread_id: str,
        message: Any,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
    ) -> bool:
        """:meth:`send_call` for a synchronous original. A send that cannot be delivered at
        once is buffered (this needs a ``synchronous`` outbox; the memory outbox is one)."""
        call = Call(fn, args, kwargs, rebind)
        if self._tel.active:
            return traced_send_sync(self, thread_id, message, call)
        return self._send_sync_guarded(thread_id, message, call)

    def _send_sync_guarded(self, thread_id: Any, message: Any, call: Call) -> bool:
        """:meth:`_send_guarded` for a synchronous original."""
        try:
            return self._send_sync(thread_id, message, call)
        except EmissionError:
            raise
        except Exception as exc:
            return self._fault(thread_id, message, exc)

    def _send_sync(self, thread_id: Any, message: Any, call: Call) -> bool:
        created_at = time.time()
        bad = self._bad_input(thread_id, message)
        if bad is not None:
            return self._conclude(
                self._record(Outcome.REJECTED, thread_name(thread_id), 0, message, bad)
            )
        if not self.outbox.synchronous:
            reason = f"a synchronous send needs a synchronous outbox; {self.outbox!r} is not"
            return self._conclude(self._record(Outcome.REJECTED, thread_id, 0, message, reason))
        slot = self._slot(thread_id)
        seq = self._next_seq(slot)
        if self._stamp is not None:
            message = self._stamped(message, seq)
        attempts, reason = 0, self._unready_reason(slot)
        if slot.state is CONNECTED and not slot.busy and not slot.backlog:
            slot.busy = slot.slow = True
            try:
                verdict, why = drive(self._attempt(call, message, False, slot, seq))
            finally:
                slot.busy = slot.slow = False
            if verdict is Verdict.OK:
                return self._conclude(
                    self._record(Outcome.DELIVERED, thread_id, seq, message, attempts=1)
                )
            attempts, reason = 1, why or ""
            if verdict is Verdict.POISON:
                entry = self._entry(slot, seq, message, call, False, created_at, attempts)
                return self._conclude(self._entry_record(entry, Outcome.FAILED, reason))
            self._set_state(slot, ConnectionState.DISCONNECTED, reason)
        entry = self._entry(slot, seq, message, call, False, created_at, attempts)
        accepted: bool = drive(self._buffer(slot, entry, reason))
        if slot.state is CONNECTED and not slot.busy:
            self._schedule_flush(slot)
        return accepted

    async def _send_slow(self, thread_id: Any, message: Any, call: Call) -> bool:
        created_at = time.time()
        bad = self._bad_input(thread_id, message)
        if bad is not None:
            return self._conclude(
                self._record(Outcome.REJECTED, thread_name(thread_id), 0, message, bad)
            )
        slot = self._slot(thread_id)
        self._loop = asyncio.get_running_loop()
        seq = self._next_seq(slot)  # in call order, also for sends that wait in line
        if self._stamp is not None:
            message = self._stamped(message, seq)
        ticket = slot.take(seq)
        if ticket is not None:
            try:
                await asyncio.shield(ticket)
            except asyncio.CancelledError:
                await self._cancelled_in_line(slot, ticket, seq, message, call, created_at)
                raise
        closing = False
        try:
            return await self._emit_in_line(slot, seq, message, call, created_at)
        except GeneratorExit:
            closing = True
            raise
        finally:
            self._leave(slot, closing)

    async def _cancelled_in_line(
        self,
        slot: ThreadSlot,
        ticket: asyncio.Future[None],
        seq: int,
        message: Any,
        call: Call,
        created_at: float,
    ) -> None:
        """The sender was cancelled while waiting for its turn: keep its event in the outbox
        (flushes never deliver past an older emission still in line, so order holds)."""
        owned = ticket.done() and not ticket.cancelled()
        if not owned:
            ticket.cancel()
        try:
            entry = self._entry(slot, seq, message, call, True, created_at, 0)
            await self._keep(slot, entry, "sender cancelled while waiting for its turn")
        finally:
            if owned:
                self._leave(slot)

    async def _keep(self, slot: ThreadSlot, entry: OutboxEntry, reason: str) -> None:
        """Buffer the event of a sender being cancelled; the cancellation wins over strict."""
        with contextlib.suppress(EmissionError):  # recorded; no caller is left to raise to
            await self._buffer(slot, entry, reason)

    async def _emit_in_line(
        self, slot: ThreadSlot, seq: int, message: Any, call: Call, created_at: float
    ) -> bool:
        """Deliver or buffer one emission; the caller holds the thread's line.

        Cancelled at any await, the emission is buffered before the cancellation goes on.
        """
        waited, attempts = 0.0, 0
        stage: str | None = "while waiting for the thread"
        try:
            opts = self.options
            reason = self._unready_reason(slot)
            if (
                slot.state is ConnectionState.CONNECTING
                and opts.on_unready == "wait"
                and not slot.timed_out
                and opts.ready_timeout > 0
            ):
                started = time.monotonic()
                slot.parked += 1  # holding the line, waiting for the association: see hold()
                try:
                    await self._wait_ready(slot, opts.ready_timeout)
                    while slot.gate is not None:  # a hold stepped ahead of us: let it finish
                        await asyncio.shield(slot.gate)
                finally:
                    slot.parked -= 1
                    waited = time.monotonic() - started
                if _state_of(slot) is ConnectionState.CONNECTING:
                    slot.timed_out = True
                    reason = f"thread not associated within ready_timeout={opts.ready_timeout}s"
                else:
                    reason = self._unready_reason(slot)
            if slot.state is CONNECTED and slot.backlog:
                stage = "while older events of the thread were flushed"
                await self._flush_in_line(slot, upto=seq)
                reason = self._unready_reason(slot)
            if slot.state is CONNECTED:
                stage, attempts = "during send", 1
                verdict, why = await self._attempt(call, message, True, slot, seq)
                stage, reason = None, why or ""
                if verdict is not Verdict.RETRY:
                    outcome = Outcome.DELIVERED if verdict is Verdict.OK else Outcome.FAILED
                    record = self._record(
                        outcome,
                        slot.thread_id,
                        seq,
                        message,
                        why,
                        waited=waited,
                        attempts=1,
                        created_at=created_at,
                    )
                    return self._conclude(record)
                self._set_state(slot, ConnectionState.DISCONNECTED, reason)
            stage = None
            entry = self._entry(slot, seq, message, call, True, created_at, attempts, waited)
            return await self._buffer(slot, entry, reason)
        except asyncio.CancelledError:
            if stage is not None:
                entry = self._entry(slot, seq, message, call, True, created_at, attempts, waited)
                await self._keep(slot, entry, f"sender cancelled {stage}")
            raise

    async def _failed_fast(
        self,
        slot: ThreadSlot,
        seq: int,
        message: Any,
        call: Call,
        verdict: Verdict,
        why: str,
        cancelled: bool = False,
    ) -> bool:
        """A hot-path delivery failed: FAILED for poison, else disconnect and buffer; leave."""
        self._seq_elsewhere += 1
        try:
            entry = self._entry(slot, seq, message, call, True, time.time(), 1)
            if verdict is Verdict.POISON:
                return self._conclude(self._entry_record(entry, Outcome.FAILED, why))
            self._set_state(slot, ConnectionState.DISCONNECTED, why)
            if cancelled:
                await self._keep(slot, entry, "sender cancelled during send")
                return False
            return await self._buffer(slot, entry, why)
        except EmissionError:
            raise
        except Exception as exc:
            return self._fault(slot.thread_id, message, exc)
        finally:
            self._leave(slot)

    def _next_seq(self, slot: ThreadSlot) -> int:
        slot.seq += 1
        self._seq_elsewhere += 1
        return slot.seq

    # ------------------------------------------------------- thread lifecycle

    def mark_connected(self, thread_id: str, owner: object = None) -> None:
        """The thread is associated with a live connection (of ``owner``, if given).

        Wakes every send waiting on the barrier and flushes the outbox before newer sends.
        Called while a transport adapter serves a connection (:func:`transport.serving`),
        that connection is the owner, whatever ``owner`` says.
        """
        check_thread_id(thread_id)
        serving = transport.serving_owner()
        if serving is not None:  # a transport adapter serves a connection here: it owns it
            owner = serving
        self._associate(thread_id, owner)

    def _associate(self, thread_id: str, owner: object) -> None:
        if self._elsewhere(self._associate, thread_id, owner):
            return
        slot = self._slot(thread_id)
        if owner is not None:
            self._own(slot, owner)
        slot.timed_out = False
        if not self._tel.complete and self._tel.refresh():  # an SDK configured since
            self._replan()
        self._set_state(slot, CONNECTED, None)
        slot.wake_ready(True)
        if slot.backlog:
            self._schedule_flush(slot)

    def mark_disconnected(self, thread_id: str, reason: str = "marked disconnected") -> None:
        """The thread has no live connection: sends buffer at once until it is associated."""
        check_thread_id(thread_id)
        if self._elsewhere(self.mark_disconnected, thread_id, reason):
            return
        slot = self._slot(thread_id)
        for key in slot.owners:
            self._owners.get(key, set()).discard(thread_id)
        slot.owners.clear()
        self._set_state(slot, ConnectionState.DISCONNECTED, reason)
        slot.wake_ready(False)

    def mark_error(self, thread_id: str, error: BaseException | str) -> None:
        """The association of the thread raised: sends buffer at once."""
        check_thread_id(thread_id)
        if self._elsewhere(self.mark_error, thread_id, error):
            return
        slot = self._slot(thread_id)
        note = (
            error
            if isinstance(error, str)
            else (f"association raised {type(error).__name__}: {error}")
        )
        self._set_state(slot, ConnectionState.ERROR, note)
        slot.wake_ready(False)

    def disconnect_owner(self, owner: object, reason: str | None = None) -> list[str]:
        """``owner`` went away: its threads that no other owner carries are disconnected.

        Returns the threads that were disconnected.
        """
        if self._elsewhere(self.disconnect_owner, owner, reason):
            return []
        key = owner_key(owner)
        gone: list[str] = []
        for thread_id in sorted(self._owners.pop(key, set())):
            slot = self._threads[thread_id]
            slot.owners.discard(key)
            if not slot.owners and slot.state is CONNECTED:
                note = reason or f"owner {owner!r} disconnected"
                self._set_state(slot, ConnectionState.DISCONNECTED, note)
                gone.append(thread_id)
        return gone

    def confirm_deliveries(self, timeout: float | None = 0.05) -> None:
        """Take an async send as delivered only when a transport adapter saw a frame leave
        (waiting up to ``timeout`` seconds for frames sent by tasks the send spawned);
        ``None`` stops confirming. The Starlette middleware turns this on."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
        ):
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        self._confirm = None if timeout is None else float(timeout)
        self._replan()

    def replay(self, thread_id: str, after: int) -> Replay:
        """What a client that last saw ``seq == after`` missed of the thread's delivered
        messages, from the replay window (option ``history``). Call it inside :meth:`hold`
        so that no send slips in between the replay and the client's attachment."""
        check_thread_id(thread_id)
        if not self._history:
            raise ValueError("replay() needs a replay window: build the guard with history=N")
        slot = self._threads.get(thread_id)
        if slot is None:
            return Replay([], complete=after == 0, latest=0)
        missed = [(seq, message) for seq, message in slot.history or () if seq > after]
        complete = slot.history_floor <= after <= slot.seq
        return Replay(missed, complete=complete, latest=slot.seq)

    @contextlib.asynccontextmanager
    async def hold(self, thread_id: str) -> AsyncIterator[None]:
        """Hold the thread's line: no delivery or flush of the thread runs meanwhile (sends
        wait their turn, in order). For replaying to a client before it goes live.

        When the line's holder is a send parked on the readiness barrier (the thread was
        never associated), this does not wait for it: nothing of the thread can be delivered
        before the association, which is what the body is about to make. The parked send,
        woken by that association, delivers only once the body has returned.
        """
        check_thread_id(thread_id)
        slot = self._slot(thread_id)
        loop = self._loop = asyncio.get_running_loop()
        while slot.gate is not None:  # another hold is stepping ahead of a parked send
            await asyncio.shield(slot.gate)
        if slot.busy and slot.parked and slot.state is ConnectionState.CONNECTING:
            gate = slot.gate = loop.create_future()
            try:
                yield
            finally:
                slot.gate = None
                gate.set_result(None)
            return
        ticket = slot.take()
        if ticket is not None:
            try:
                await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled():
                    self._leave(slot)
                raise
        try:
            yield
        finally:
            self._leave(slot)

    def subscribe(self, thread_id: str, *, maxsize: int = 1000) -> Subscription:
        """Open a :class:`~emitguard.subscriptions.Subscription` to the thread's deliveries
        (for a fallback transport such as Server-Sent Events). It counts as a connection of
        the thread: the thread is associated now (its outbox flushes to it), and disconnected
        when the last carrier goes. Open it inside :meth:`hold` after a :meth:`replay` so
        that nothing falls between the two."""
        check_thread_id(thread_id)
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1, got {maxsize!r}")
        slot = self._slot(thread_id)
        subscription = Subscription(thread_id, maxsize, self._unsubscribed)
        slot.subscribers.append(subscription)
        self._subscribed += 1
        self._replan()
        self._associate(thread_id, subscription)  # the subscription owns it, not a connection
        return subscription

    def end_subscriptions(self, thread_id: str, reason: str = "ended by the server") -> int:
        """Close every subscription of the thread (their clients reconnect and resume);
        returns how many were open."""
        slot = self._threads.get(thread_id)
        open_ones = list(slot.subscribers) if slot is not None else []
        for subscription in open_ones:
            subscription.close(reason)
        return len(open_ones)

    def _unsubscribed(self, subscription: Subscription) -> None:
        slot = self._threads.get(subscription.thread_id)
        if slot is not None and subscription in slot.subscribers:
            slot.subscribers.remove(subscription)
            self._subscribed -= 1
            self._replan()
        self.disconnect_owner(subscription, f"subscription closed: {subscription.reason}")

    @property
    def telemetry_active(self) -> bool:
        """Whether this guard records OpenTelemetry spans or metrics: an SDK stands behind a
        provider it uses and the option for it is on (see ``docs/tracing.md``)."""
        return self._tel.active

    def state(self, thread_id: str) -> ConnectionState:
        """The thread's state (``CONNECTING`` for a thread the guard never saw)."""
        slot = self._threads.get(thread_id)
        return slot.state if slot is not None else ConnectionState.CONNECTING

    def threads(self) -> Iterator[str]:
        """Every thread the guard knows."""
        return iter(list(self._threads))

    async def wait_ready(self, thread_id: str, timeout: float | None = None) -> bool:
        """Wait until the thread is associated; False when ``timeout`` (default
        ``ready_timeout``) passes first. Agent executors await this before they start."""
        check_thread_id(thread_id)
        slot = self._slot(thread_id)
        self._loop = asyncio.get_running_loop()
        if slot.state is CONNECTED:
            return True
        await self._wait_ready(slot, self.options.ready_timeout if timeout is None else timeout)
        return _state_of(slot) is CONNECTED

    async def _wait_ready(self, slot: ThreadSlot, timeout: float) -> None:
        """Wait for the association (one future, one timer: a wake is a single loop hop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        slot.ready.append(future)
        timer = loop.call_later(timeout, _give_up, future)
        try:
            await future
        finally:
            timer.cancel()
            if future in slot.ready:
                slot.ready.remove(future)

    # ---------------------------------------------------------- maintenance

    def stats(self) -> GuardStats:
        """Counts per outcome, pending per thread and thread states (expiring what is due)."""
        if self.outbox.synchronous:
            drive(self._expire())
        outcomes = dict(self._counts)
        slots = self._threads.values()
        hot_in_flight = sum(1 for slot in slots if slot.busy and not slot.slow)
        issued = sum(slot.seq for slot in slots)
        outcomes[Outcome.DELIVERED] += issued - self._seq_elsewhere - hot_in_flight
        pending = {slot.thread_id: slot.backlog for slot in self._backlogged}
        states = {name: slot.state for name, slot in self._threads.items()}
        return GuardStats(outcomes, pending, states)

    async def pending(self, thread_id: str | None = None) -> list[OutboxEntry]:
        """The buffered entries of one thread, or of every thread, oldest first."""
        if thread_id is not None:
            return await self.outbox.entries(thread_id)
        found: list[OutboxEntry] = []
        for name in sorted(slot.thread_id for slot in self._backlogged):
            found.extend(await self.outbox.entries(name))
        return found

    async def drain(self, timeout: float = 5.0) -> int:
        """Deliver what can be delivered within ``timeout`` seconds; return how many
        emissions are still buffered (expired ones are recorded and not counted)."""
        deadline = time.monotonic() + timeout
        self._loop = asyncio.get_running_loop()
        while True:
            await self._expire()
            for slot in list(self._backlogged):
                if slot.state is CONNECTED:
                    self._schedule_flush(slot)
            busy = any(slot.busy for slot in self._threads.values())
            remaining = deadline - time.monotonic()
            if (not self._tasks and not busy) or remaining <= 0:
                return self._total
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=min(remaining, 0.05))
            else:
                await asyncio.sleep(min(remaining, 0.005))

    async def aclose(self) -> None:
        """Stop background work. Buffered emissions stay in the outbox, still BUFFERED."""
        self.closed = True
        tasks = [*self._tasks, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None


def _give_up(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


def _state_of(slot: ThreadSlot) -> ConnectionState:
    """The slot's state, read afresh (keeps type checkers from narrowing across awaits)."""
    return slot.state
