"""The outbox flow: buffering with bounds, in-order flushes, retries with backoff, TTL expiry.

Everything that enters or leaves the outbox passes here, with its record. The caller of
:meth:`Flow.buffer` and :meth:`Flow.flush_in_line` holds the thread's line; :meth:`Flow.schedule`
starts a flush on the right event loop from anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from emitguard._delivery import Delivery
from emitguard._loops import Signal, alive, call_on, later, running_loop
from emitguard._recorder import Recorder
from emitguard._slot import ThreadSlot
from emitguard._table import ThreadTable
from emitguard._telemetry import FLUSH, Scope, Telemetry
from emitguard.calls import Call, Verdict
from emitguard.options import GuardOptions
from emitguard.outbox import Outbox, OutboxEntry, drive
from emitguard.records import Emission
from emitguard.states import ConnectionState, Outcome

__all__ = ["Flow", "expired_reason"]

log = logging.getLogger("emitguard")

CONNECTED = ConnectionState.CONNECTED


class Flow:
    """Moves emissions into the outbox and out of it again, always in ``seq`` order."""

    def __init__(
        self,
        options: GuardOptions,
        outbox: Outbox,
        table: ThreadTable,
        recorder: Recorder,
        delivery: Delivery,
        telemetry: Telemetry,
    ) -> None:
        self.options = options
        self.outbox = outbox
        self._table = table
        self._recorder = recorder
        self._delivery = delivery
        self._tel = telemetry
        self.total = 0
        """Entries in the outbox over all threads."""
        self.backlogged: set[ThreadSlot] = set()
        self.in_flight: set[tuple[Any, int]] = set()
        """(thread, seq) of outbox entries whose delivery is under way (never evicted)."""
        self.changed = Signal()
        """Fired whenever an entry leaves the outbox or a thread is associated."""
        self.tasks: set[asyncio.Task[Any]] = set()
        self.idlers: set[asyncio.Task[Any]] = set()
        """Tasks that may idle after their work is done (confirmers): cancelled at close,
        not waited for by :meth:`drain`."""
        self._sweeper: asyncio.Task[None] | None = None
        self.closed = False
        self.home: asyncio.AbstractEventLoop | None = None
        """The last event loop the guard worked on (its timers run there when they are set
        from code that runs on no loop)."""

    # ------------------------------------------------------------ into it

    def entry(
        self,
        slot: ThreadSlot,
        seq: int,
        message: Any,
        deliver: Any,
        is_async: bool,
        created_at: float,
        attempts: int,
        waited: float = 0.0,
    ) -> OutboxEntry:
        """An outbox entry for an emission of the thread."""
        kind = deliver.kind if isinstance(deliver, Call) else None
        return OutboxEntry(
            thread_id=slot.thread_id,
            seq=seq,
            message=message,
            event_type=kind if kind is not None else self._recorder.type_of(message),
            created=time.monotonic() - (time.time() - created_at),
            created_at=created_at,
            deliver=deliver,
            is_async=is_async,
            attempts=attempts,
            waited=waited,
            loop=running_loop() if is_async else None,
        )

    async def buffer(self, slot: ThreadSlot, entry: OutboxEntry, reason: str) -> bool:
        """Put an emission into the outbox, applying the bounds; records what happened."""
        recorder = self._recorder
        no_data = (  # an event whose call names its type apart, sent without data
            entry.message is None
            and isinstance(entry.deliver, Call)
            and entry.deliver.kind is not None
        )
        cannot = None if no_data else self.outbox.check(entry.message)
        if cannot is not None:
            outcome = Outcome.FAILED if entry.attempts else Outcome.REJECTED
            return recorder.conclude(recorder.of_entry(entry, outcome, f"{reason}; {cannot}"))
        opts = self.options
        thread_full = slot.backlog >= opts.max_per_thread
        if thread_full or self.total >= opts.max_total:
            bound = (
                f"max_per_thread={opts.max_per_thread}"
                if thread_full
                else (f"max_total={opts.max_total}")
            )
            full = f"outbox full, {bound}"
            if opts.overflow == "reject":
                return recorder.conclude(recorder.of_entry(entry, Outcome.REJECTED, full))
            if opts.overflow == "drop_newest" and entry.event_type not in opts.protect:
                why = f"{full}, overflow=drop_newest"
                return recorder.conclude(recorder.of_entry(entry, Outcome.DROPPED, why))
            victim = await self.outbox.evict_oldest(
                slot.thread_id if thread_full else None, opts.protect, self.in_flight
            )
            if victim is None:
                why = f"{full}, every buffered event is protected"
                return recorder.conclude(recorder.of_entry(entry, Outcome.DROPPED, why))
            why = f"{full}, evicted for a newer event ({opts.overflow})"
            self._left(victim, Outcome.DROPPED, why)
        entry.buffered = time.monotonic()
        if self._tel.active and entry.link is None:
            entry.link = self._tel.current_link()
        if entry.loop is not None:
            slot.loop = entry.loop
        await self.outbox.push(entry)
        slot.backlog += 1
        self.total += 1
        self.backlogged.add(slot)
        self._ensure_sweeper()
        return recorder.conclude(recorder.of_entry(entry, Outcome.BUFFERED, reason))

    def buffer_now(self, slot: ThreadSlot, entry: OutboxEntry, reason: str) -> bool:
        """:meth:`buffer` from synchronous code (a synchronous outbox never suspends)."""
        accepted: bool = drive(self.buffer(slot, entry, reason))
        return accepted

    # ---------------------------------------------------------- out of it

    @staticmethod
    def retrying(slot: ThreadSlot) -> bool:
        """Whether the thread waits out a retry backoff (its timer has not fired yet)."""
        return slot.retry is not None

    def failed(self, slot: ThreadSlot, why: str) -> str:
        """A delivery to the thread failed: retry after a short backoff while the thread is
        associated, and take it as disconnected once the retries are used up. Returns the
        reason to record with the kept event."""
        backoff = self.options.retry_backoff
        if slot.state is CONNECTED and slot.failures < len(backoff):
            delay = backoff[slot.failures]
            slot.failures += 1
            slot.retry_at = time.monotonic() + delay
            if slot.retry is not None:
                slot.retry.cancel()
            slot.retry = later(delay, lambda: self._retry_due(slot), self.home)
            return f"{why}; retry {slot.failures} of {len(backoff)} in {delay}s"
        if slot.state is CONNECTED:
            why = f"{why} ({len(backoff)} retries failed)" if backoff else why
            self._table.set_state(slot, ConnectionState.DISCONNECTED, why)
        return why

    def delivered(self, slot: ThreadSlot) -> None:
        """A delivery worked: the thread's retry count starts over."""
        if slot.failures:
            self.reset_retry(slot)

    def reset_retry(self, slot: ThreadSlot) -> None:
        """Forget the thread's failed deliveries (it was associated anew)."""
        slot.failures = 0
        slot.retry_at = 0.0
        if slot.retry is not None:
            slot.retry.cancel()
            slot.retry = None

    def _retry_due(self, slot: ThreadSlot) -> None:
        slot.retry = None
        slot.retry_at = 0.0
        self.schedule(slot)

    async def flush_in_line(self, slot: ThreadSlot, upto: int | None = None) -> None:
        """Deliver the thread's buffered emissions in order (those with ``seq <= upto``).

        Stops at the first failed delivery (which is retried after a backoff); an event the
        send can never take (poison) is FAILED and the flush goes on. The caller holds the
        line.
        """
        ttl = self.options.ttl
        if slot.flight:  # what is still in flight may come back to the outbox first
            await slot.flight.settled()
        while slot.state is CONNECTED and slot.backlog and not self.retrying(slot):
            entry = await self.outbox.head(slot.thread_id)
            if entry is None:
                log.error("outbox %r lost %d event(s) of %s", self.outbox, slot.backlog, slot)
                self.total -= slot.backlog
                slot.backlog = 0
                self.backlogged.discard(slot)
                break
            if upto is not None and entry.seq > upto:
                break
            if ttl is not None and time.monotonic() - entry.created > ttl:
                await self._settle(entry, Outcome.EXPIRED, expired_reason(ttl))
                continue
            if entry.deliver is None:
                await self._settle(entry, Outcome.FAILED, "no send to deliver it with")
                continue
            entry.attempts += 1
            key = (entry.thread_id, entry.seq)
            self.in_flight.add(key)
            try:
                verdict, why, scope = await self._attempt_entry(slot, entry)
            finally:
                self.in_flight.discard(key)
            if verdict is Verdict.RETRY:
                why = self.failed(slot, f"flush failed: {why}")
                if scope is not None:  # the span says so; the entry stays BUFFERED
                    scope.record = self._recorder.of_entry(entry, Outcome.BUFFERED, why)
                    self._tel.finish(scope)
                break
            if verdict is Verdict.OK:
                self.delivered(slot)
                why = f"delivered from the outbox on attempt {entry.attempts}"
                await self._settle(entry, Outcome.FLUSHED, why, scope)
            else:
                await self._settle(entry, Outcome.FAILED, why, scope)

    async def _attempt_entry(
        self, slot: ThreadSlot, entry: OutboxEntry
    ) -> tuple[Verdict, str | None, Scope | None]:
        """Deliver a buffered entry once, under a flush span linked to the one that buffered
        it (when telemetry is active)."""
        assert entry.deliver is not None
        args = (entry.deliver, entry.message, entry.is_async, slot, entry.seq, entry.loop)
        tel = self._tel
        if not tel.active:
            return (*await self._delivery.attempt(*args), None)
        scope = Scope(tel.start(FLUSH, entry.thread_id, entry.seq, entry.event_type, entry.link))
        try:
            with scope:
                verdict, why = await self._delivery.attempt(*args)
        except BaseException:
            tel.finish(scope)
            raise
        return verdict, why, scope

    async def _settle(
        self, entry: OutboxEntry, outcome: Outcome, reason: str | None, scope: Scope | None = None
    ) -> None:
        """Take an entry out of the outbox with its terminal outcome. A backend that no
        longer holds it still gets the entry accounted for, so no flush loops on it."""
        if not await self.outbox.remove(entry.thread_id, entry.seq):
            log.error(
                "outbox %r no longer holds %s seq %d; counted as %s",
                self.outbox,
                entry.thread_id,
                entry.seq,
                outcome.name,
            )
        self._left(entry, outcome, reason, scope)

    def _left(
        self, entry: OutboxEntry, outcome: Outcome, reason: str | None, scope: Scope | None = None
    ) -> None:
        """Account for an entry that left the outbox, record it, and trace it: end its flush
        span, or give the emission a short span of its own when it left without a try."""
        self.total -= 1
        slot = self._table.get(entry.thread_id)
        if slot is not None:
            slot.backlog -= 1
            if not slot.backlog:
                slot.warned = False
                self.backlogged.discard(slot)
                self._table.settled(slot)
        record: Emission = self._recorder.note(self._recorder.of_entry(entry, outcome, reason))
        if scope is not None:
            scope.record = record
            self._tel.finish(scope)
        elif self._tel.active:
            self._tel.settle(record, entry.link)
        self.changed.fire()

    # --------------------------------------------------------- flushing

    def here(self) -> None:
        """Remember the loop running here as the guard's home (called on its async paths)."""
        loop = running_loop()
        if loop is not None:
            self.home = loop

    def leave(self, slot: ThreadSlot, closing: bool = False) -> None:
        """Give up the thread's line; flush what was buffered meanwhile.

        ``closing``: the holder's coroutine is being garbage-collected (its loop is gone);
        free the line but start nothing from there.
        """
        self._table.release(slot)
        if not closing and slot.backlog and slot.state is CONNECTED:
            self.schedule(slot)  # (not while a retry waits: its timer schedules it)

    def schedule(self, slot: ThreadSlot) -> None:
        """Start a flush of the thread, on the loop of its sends when that loop runs, else
        on the loop running here; with neither, in a private loop right here."""
        if slot.flushing or self.closed or self.retrying(slot):
            return
        here = running_loop()
        home = slot.loop if alive(slot.loop) else here
        if home is not None:
            slot.flushing = True
            if home is here:
                self._spawn_flush(slot)
                return
            if call_on(home, self._spawn_flush, slot):
                return
            slot.flushing = False
        self._flush_privately(slot)

    def _flush_privately(self, slot: ThreadSlot) -> None:
        """No event loop runs here, nor the one the thread's sends came from (it closed):
        flush to the end right here, in a private loop, for a bounded time (a synchronous
        caller is blocked meanwhile)."""
        if not self._table.try_take(slot):
            return  # its holder flushes when it leaves
        limit = max(self.options.ready_timeout, 1.0)

        async def flush() -> None:
            try:
                await self.flush_in_line(slot)
            finally:
                self._table.release(slot)

        try:
            asyncio.run(asyncio.wait_for(flush(), limit))
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("%s: flush gave up after %ss; the rest stays buffered", slot, limit)
        except Exception:
            log.exception("emitguard could not flush %s", slot)
        self._forget_dead_tasks()  # (any spawned as the private loop wound down)
        if slot.retry is not None:  # its timer died with the private loop
            delay = max(slot.retry_at - time.monotonic(), 0.0)
            slot.retry = later(delay, lambda: self._retry_due(slot), self.home)

    def _forget_dead_tasks(self) -> None:
        """Drop tasks whose loop closed before they ran (their done callback never comes)."""
        for task in list(self.tasks):  # (a copy made at once: other threads may spawn)
            if task.get_loop().is_closed():
                self.tasks.discard(task)

    def _spawn_flush(self, slot: ThreadSlot) -> None:
        self.spawn(self._flush_task(slot))

    def spawn(self, coro: Any, *, idles: bool = False) -> None:
        """Run ``coro`` as a task of the running loop, tracked until it ends (``idles``: one
        of :attr:`idlers`)."""
        task = asyncio.get_running_loop().create_task(coro)
        tracked = self.idlers if idles else self.tasks
        tracked.add(task)
        task.add_done_callback(tracked.discard)

    async def _flush_task(self, slot: ThreadSlot) -> None:
        ticket = self._table.join(slot)
        if ticket is not None:
            assert ticket.future is not None
            try:
                await ticket.future
            except asyncio.CancelledError:
                slot.flushing = False
                if ticket.future.done() and not ticket.future.cancelled():
                    self._table.release(slot)  # the line was handed to us just now
                raise
        closing = False
        try:
            slot.flushing = False
            await self.flush_in_line(slot)
        except GeneratorExit:
            closing = True
            raise
        finally:
            slot.flushing = False
            self.leave(slot, closing)

    # ------------------------------------------------------------ expiry

    async def expire(self) -> None:
        """Expire what is older than the TTL in every thread not being flushed."""
        ttl = self.options.ttl
        if ttl is None or not self.total:
            return
        cutoff = time.monotonic() - ttl
        for slot in list(self.backlogged):
            if not self._table.try_take(slot):
                continue  # its holder checks expiry before every delivery
            try:
                for entry in await self.outbox.expire(slot.thread_id, cutoff):
                    self._left(entry, Outcome.EXPIRED, expired_reason(ttl))
                if slot.backlog and not slot.warned:
                    await self._warn_if_stale(slot, ttl)
            finally:
                self._table.release(slot)

    async def _warn_if_stale(self, slot: ThreadSlot, ttl: float) -> None:
        """Log once (until its backlog empties) a thread whose oldest buffered event has used
        up half its TTL, with the reason it is still waiting."""
        head = await self.outbox.head(slot.thread_id)
        if head is None:
            return
        age = time.monotonic() - head.created
        if age < ttl / 2:
            return
        slot.warned = True
        why = f"{slot.state.value}: {slot.note}" if slot.note else slot.state.value
        log.warning(
            "emitguard %s: %d event(s) buffered for %r, the oldest for %.1fs of ttl=%ss "
            "(thread %s); they expire unless it is associated",
            self._recorder.guard_name,
            slot.backlog,
            slot.thread_id,
            age,
            ttl,
            why,
        )

    def _ensure_sweeper(self) -> None:
        if self.options.ttl is None or self.closed:
            return
        loop = running_loop()
        if loop is None:
            return  # stats(), drain() and flushes expire lazily
        sweeper = self._sweeper
        if sweeper is not None and not sweeper.done() and sweeper.get_loop() is loop:
            return
        task = asyncio.current_task()
        if task is not None and getattr(task, "cancelling", lambda: 0)():
            return  # the loop is winding this task down; do not leave a task behind
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        ttl = self.options.ttl
        assert ttl is not None
        interval = min(max(ttl / 4, 0.01), 1.0)
        self._tel.isolate()
        while self.total and not self.closed:
            await asyncio.sleep(interval)
            await self.expire()

    # ------------------------------------------------------- drain, close

    async def drain(self, timeout: float, busy: Any) -> int:
        """Wait until the outbox is empty and ``busy()`` is false (no send waiting for its
        thread), or ``timeout`` seconds passed; return how many entries are left."""
        deadline = time.monotonic() + timeout
        self.here()
        while True:
            await self.expire()
            for slot in list(self.backlogged):
                if slot.state is CONNECTED and not self.retrying(slot):
                    self.schedule(slot)
            remaining = deadline - time.monotonic()
            if (not self.total and not self.tasks and not busy()) or remaining <= 0:
                return self.total
            await self.changed.wait(min(remaining, 0.05))

    async def close(self) -> None:
        """Stop background work and close the outbox; what is still buffered is logged."""
        self.closed = True
        self._forget_dead_tasks()
        here = asyncio.get_running_loop()
        tasks = []
        idle = [*self.idlers, *([self._sweeper] if self._sweeper else [])]
        for task in [*self.tasks, *idle]:
            if task.get_loop() is here:
                task.cancel()
                tasks.append(task)
            else:  # another loop's task: cancelled there, not awaited from here
                call_on(task.get_loop(), task.cancel)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None
        for slot in list(self.backlogged):
            if slot.retry is not None:
                slot.retry.cancel()
        self.report_left("closed")
        await self.outbox.close()

    def report_left(self, when: str) -> None:
        """Log what is still buffered (a memory outbox cannot keep it past the process)."""
        if not self.total:
            return
        threads = sorted(repr(slot.thread_id) for slot in self.backlogged)
        more = f" and {len(threads) - 10} more" if len(threads) > 10 else ""
        shown = ", ".join(threads[:10]) + more
        log.warning(
            "emitguard guard %s with %d event(s) still buffered for %d thread(s): %s",
            when,
            self.total,
            len(threads),
            shown,
        )


def expired_reason(ttl: float) -> str:
    """The reason recorded for an expired entry."""
    return f"expired after ttl={ttl}s in the outbox"
