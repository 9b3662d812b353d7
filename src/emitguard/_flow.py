"""The outbox flow: buffering with bounds, in-order flushes, the thread's line, TTL expiry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from emitguard import transport
from emitguard._core import CONNECTED, GuardCore, log
from emitguard._line import ThreadSlot
from emitguard._telemetry import FLUSH, Scope
from emitguard.calls import Verdict, judge, judge_error
from emitguard.outbox import OutboxEntry
from emitguard.records import Emission
from emitguard.states import ConnectionState, Outcome


class OutboxFlow(GuardCore):
    """Moves emissions into the outbox and out of it again, always in ``seq`` order."""

    async def _attempt(
        self,
        deliver: Any,
        message: Any,
        is_async: bool,
        slot: ThreadSlot | None = None,
        seq: int = 0,
    ) -> tuple[Verdict, str | None]:
        """Call the original send once; cancellation propagates.

        While deliveries are confirmed, an async send that reports success counts only when
        a transport saw a frame leave (:mod:`emitguard.transport`); the connections that
        carried it then own the thread. The thread's subscriptions get the message too, and
        one that took it makes the delivery count even when the original found no socket.
        """
        probe = token = None
        if self._confirm is not None and is_async:
            probe, token = transport.open_probe()
        try:
            result = deliver(message)
            if is_async:
                result = await result
        except Exception as exc:
            if self._tel.active:
                self._tel.failed_attempt(exc)
            failed, text = judge_error(exc, self._poison)
            if failed is Verdict.RETRY and slot is not None and _fan_out(slot, seq, message):
                return Verdict.OK, None
            return failed, text
        finally:
            if token is not None:
                transport.close_probe(token)
        verdict, why = judge(result)
        if slot is not None and slot.subscribers and _fan_out(slot, seq, message):
            return Verdict.OK, None
        if probe is not None and verdict is Verdict.OK:
            carriers = slot.owners if slot is not None else ()
            if not probe.frames and not await probe.wait(self._confirm or 0.0, carriers):
                return Verdict.RETRY, UNCONFIRMED
            if slot is not None:
                self._adopt(slot, probe)
        return verdict, why

    async def _attempt_entry(
        self, slot: ThreadSlot, entry: OutboxEntry
    ) -> tuple[Verdict, str | None, Scope | None]:
        """Deliver a buffered entry once, under a flush span linked to the one that buffered
        it (when telemetry is active)."""
        tel = self._tel
        if not tel.active:
            attempt = self._attempt(entry.deliver, entry.message, entry.is_async, slot, entry.seq)
            return (*await attempt, None)
        span = tel.start(FLUSH, entry.thread_id, entry.seq, entry.event_type, entry.link)
        scope = Scope(span)
        try:
            with scope:
                verdict, why = await self._attempt(
                    entry.deliver, entry.message, entry.is_async, slot, entry.seq
                )
        except BaseException:
            tel.finish(scope)
            raise
        return verdict, why, scope

    async def _buffer(self, slot: ThreadSlot, entry: OutboxEntry, reason: str) -> bool:
        """Put an emission into the outbox, applying the bounds; records what happened."""
        cannot = self.outbox.check(entry.message)
        if cannot is not None:
            outcome = Outcome.FAILED if entry.attempts else Outcome.REJECTED
            return self._conclude(self._entry_record(entry, outcome, f"{reason}; {cannot}"))
        opts = self.options
        thread_full = slot.backlog >= opts.max_per_thread
        if thread_full or self._total >= opts.max_total:
            bound = (
                f"max_per_thread={opts.max_per_thread}"
                if thread_full
                else f"max_total={opts.max_total}"
            )
            full = f"outbox full, {bound}"
            if opts.overflow == "reject":
                return self._conclude(self._entry_record(entry, Outcome.REJECTED, full))
            if opts.overflow == "drop_newest" and entry.event_type not in opts.protect:
                return self._conclude(
                    self._entry_record(entry, Outcome.DROPPED, f"{full}, overflow=drop_newest")
                )
            victim = await self.outbox.evict_oldest(
                slot.thread_id if thread_full else None, opts.protect, self._in_flight
            )
            if victim is None:
                return self._conclude(
                    self._entry_record(
                        entry, Outcome.DROPPED, f"{full}, every buffered event is protected"
                    )
                )
            self._forget(victim)
            self._left(
                victim,
                self._note(
                    self._entry_record(
                        victim,
                        Outcome.DROPPED,
                        f"{full}, evicted for a newer event ({opts.overflow})",
                    )
                ),
            )
        entry.buffered = time.monotonic()
        if self._tel.active and entry.link is None:
            entry.link = self._tel.current_link()
        await self.outbox.push(entry)
        slot.backlog += 1
        self._total += 1
        self._backlogged.add(slot)
        self._ensure_sweeper()
        return self._conclude(self._entry_record(entry, Outcome.BUFFERED, reason))

    async def _flush_in_line(self, slot: ThreadSlot, upto: int | None = None) -> None:
        """Deliver the thread's buffered emissions in order (those with ``seq <= upto``).

        Stops at the first failed delivery, which disconnects the thread; an event the send
        can never take (poison) is FAILED and the flush goes on. The caller holds the line.
        """
        ttl = self.options.ttl
        while slot.state is CONNECTED and slot.backlog:
            entry = await self.outbox.head(slot.thread_id)
            if entry is None:
                log.error("outbox %r lost %d event(s) of %s", self.outbox, slot.backlog, slot)
                self._total -= slot.backlog
                slot.backlog = 0
                self._backlogged.discard(slot)
                break
            waiting = slot.first_waiting()
            if (upto is not None and entry.seq > upto) or (
                waiting is not None and entry.seq > waiting
            ):
                break  # an older emission is still on its way: it goes first
            if ttl is not None and time.monotonic() - entry.created > ttl:
                await self._settle(entry, Outcome.EXPIRED, expired_reason(ttl))
                continue
            if entry.deliver is None:
                await self._settle(entry, Outcome.FAILED, "no send to deliver it with")
                continue
            entry.attempts += 1
            key = (entry.thread_id, entry.seq)
            self._in_flight.add(key)  # not evicted while the send runs
            try:
                verdict, why, scope = await self._attempt_entry(slot, entry)
            finally:
                self._in_flight.discard(key)
            if verdict is Verdict.RETRY:
                why = f"flush failed: {why}"
                self._set_state(slot, ConnectionState.DISCONNECTED, why)
                if scope is not None:  # the span says so; the entry stays BUFFERED
                    scope.record = self._entry_record(entry, Outcome.BUFFERED, why)
                    self._tel.finish(scope)
                break
            if verdict is Verdict.OK:
                why = f"delivered from the outbox on attempt {entry.attempts}"
                await self._settle(entry, Outcome.FLUSHED, why, scope)
            else:
                await self._settle(entry, Outcome.FAILED, why, scope)

    async def _settle(
        self, entry: OutboxEntry, outcome: Outcome, reason: str | None, scope: Scope | None = None
    ) -> None:
        """Take an entry out of the outbox with its terminal outcome."""
        if not await self.outbox.remove(entry.thread_id, entry.seq):
            log.error(
                "outbox %r no longer holds %s seq %d", self.outbox, entry.thread_id, entry.seq
            )
            if scope is not None:
                self._tel.finish(scope)
            return
        self._forget(entry)
        self._left(entry, self._note(self._entry_record(entry, outcome, reason)), scope)

    def _left(self, entry: OutboxEntry, record: Emission, scope: Scope | None = None) -> None:
        """Trace an entry that left the outbox: end its flush span, or give the emission a
        short span of its own when it left without a delivery attempt."""
        if scope is not None:
            scope.record = record
            self._tel.finish(scope)
        elif self._tel.active:
            self._tel.settle(record, entry.link)

    def _forget(self, entry: OutboxEntry) -> None:
        """Account for an entry that left the outbox."""
        self._total -= 1
        slot = self._threads.get(entry.thread_id)
        if slot is not None:
            slot.backlog -= 1
            if not slot.backlog:
                self._backlogged.discard(slot)

    # ------------------------------------------------------------- the line

    def _leave(self, slot: ThreadSlot, closing: bool = False) -> None:
        """Give up the thread's line; flush what was buffered meanwhile.

        ``closing``: the holder's coroutine is being garbage-collected (its loop is gone);
        free the line but start nothing from there.
        """
        if slot.hand_on() or closing:
            return
        if slot.backlog and slot.state is CONNECTED:
            self._schedule_flush(slot)

    async def _flush_task(self, slot: ThreadSlot) -> None:
        ticket = slot.take()
        if ticket is not None:
            try:
                await ticket
            except asyncio.CancelledError:
                slot.flush_pending = False
                if ticket.done() and not ticket.cancelled():
                    self._leave(slot)  # the line was handed to us just now: pass it on
                raise  # else we never held the line: nothing to give up
        closing = False
        try:
            slot.flush_pending = False
            if slot.state is CONNECTED:
                await self._flush_in_line(slot)
        except GeneratorExit:
            closing = True
            raise
        finally:
            slot.flush_pending = False
            self._leave(slot, closing)

    def _schedule_flush(self, slot: ThreadSlot) -> None:
        """Start a flush of the thread on an event loop, wherever this was called from."""
        if slot.flush_pending:
            return
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            slot.flush_pending = True
            self._spawn(self._flush_task(slot))
            return
        known = self._loop
        if known is not None and not known.is_closed():
            # Running in another OS thread, or paused between run_until_complete() calls:
            # the flush waits for that loop, where the line's holder and waiters live.
            known.call_soon_threadsafe(self._schedule_flush, slot)
            return
        # No event loop is left that could run it: whoever held the thread's line died with
        # its loop. Flush to the end right here, in a private loop.
        if slot.busy:
            log.warning("%s: the line's holder died with its event loop; line reset", slot)
            slot.reset_line()
        slot.flush_pending = True
        limit = max(self.options.ready_timeout, 1.0)  # a sync caller is blocked meanwhile
        try:
            asyncio.run(asyncio.wait_for(self._flush_task(slot), limit))
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("%s: flush gave up after %ss; the rest stays buffered", slot, limit)
        except Exception:
            log.exception("emitguard could not flush %s", slot)

    # ----------------------------------------------------------- expiry

    async def _expire(self) -> None:
        ttl = self.options.ttl
        if ttl is None or not self._total:
            return
        cutoff = time.monotonic() - ttl
        for slot in list(self._backlogged):
            if slot.busy:
                continue  # its holder checks expiry before every delivery
            for entry in await self.outbox.expire(slot.thread_id, cutoff):
                self._forget(entry)
                record = self._entry_record(entry, Outcome.EXPIRED, expired_reason(ttl))
                self._left(entry, self._note(record))

    def _ensure_sweeper(self) -> None:
        if self.options.ttl is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
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
        while self._total:
            await asyncio.sleep(interval)
            await self._expire()


def _fan_out(slot: ThreadSlot, seq: int, message: Any) -> bool:
    """Hand a delivery to the thread's subscriptions; True when one took it."""
    took = False
    for subscription in list(slot.subscribers):
        took = subscription.offer(seq, message) or took
    return took


UNCONFIRMED = (
    "unconfirmed: the send reported success but no frame left through the transport, "
    "neither from the send nor on a connection carrying the thread (a shortcut that returns "
    "True without sending?)"
)


def expired_reason(ttl: float) -> str:
    return f"expired after ttl={ttl}s in the outbox"
