"""Sends handed over and waiting for their confirmation, several per thread at once.

While a guard confirms deliveries, a send normally holds its thread's line until its frame
leaves: the caller waits for the consumer, and sends of a thread go one consumer round trip
at a time. When the transport tags the message (:func:`emitguard.transport.tag`: the frames
of that message, and only those, confirm it) the send can leave that wait behind: it is handed
over, the line is free for the next one, and the thread's *confirmer* task takes the outcomes
in seq order, each one recorded when its frame left.

Handed over in order, confirmed in order: a transport delivers a thread's messages to each of
its connections first in, first out, so when one send is not confirmed (its consumer died
with it in its queue) none after it to the same connections is either. The first one that is
not confirmed in time, and every one after it still waiting, is kept in the outbox in seq
order and sent again (retried, and flushed after the next association), as a send that was
confirmed on the spot would be.

Nothing overtakes what is in flight: a send is confirmed behind only while the thread's
connections are those it had when the oldest send in flight was handed over (a connection that
joins since could be sent a newer event before an older one comes back to it), and every
other way to deliver (the general path, a flush) first waits until nothing of the thread is
in flight (``Flights.settled``). It runs only on the event loop the thread was associated
on (a short-lived loop, as ``async_to_sync`` runs, would take the confirmer with it), with an
outbox that never suspends (buffering a failed send needs no line), and not in strict mode (a
failure has no caller left to raise to).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emitguard import transport
from emitguard._delivery import UNCONFIRMED
from emitguard._loops import call_on, running_loop
from emitguard._slot import ThreadSlot
from emitguard.calls import Call

if TYPE_CHECKING:
    from emitguard._pipeline import Pipeline
    from emitguard.transport import Probe

__all__ = ["DEPTH", "Flight", "InFlight"]

DEPTH = 32
"""Sends of one thread in flight at most; the next one waits for its confirmation."""


class Flight:
    """One send handed over, waiting for its confirmation."""

    __slots__ = ("call", "message", "probe", "sent", "seq", "started")

    def __init__(
        self, seq: int, message: Any, sent: Any, call: Call, probe: Probe, started: int
    ) -> None:
        self.seq = seq
        self.message = message
        self.sent = sent
        """What the original was given (with its seq stamped in, if stamped)."""
        self.call = call
        self.probe = probe
        self.started = started
        """``time.time_ns()`` of the call (0: nobody needs it)."""


class InFlight:
    """The confirmers of a guard's threads."""

    def __init__(
        self,
        pipeline: Pipeline,
        noted: Callable[[ThreadSlot, int, Any, Probe, int, str | None], None],
        traced: Callable[[ThreadSlot, int, Any, int, str | None], None],
    ) -> None:
        self._pipeline = pipeline
        self._noted = noted
        """Records a confirmed send (its new connections, its record or the window)."""
        self._traced = traced
        """Ends a confirmed send's span (when telemetry is active)."""

    def takes(self, slot: ThreadSlot) -> bool:
        """Whether the send that holds the thread's line now may be confirmed behind."""
        pipeline = self._pipeline
        flight = slot.flight
        loop = flight.loop if flight else slot.home
        return (
            loop is not None
            and loop is running_loop()
            and pipeline.behind
            and not slot.backlog  # (kept while this send was handed over: no more in flight)
            and (not flight or (len(flight) < DEPTH and slot.joined == flight.joined))
        )

    def hand(self, slot: ThreadSlot, flight: Flight) -> None:
        """``flight`` was handed over (the caller holds the line, and gives it up next)."""
        queue = slot.flight
        if not queue:
            queue.since = time.monotonic()
            queue.loop = running_loop()
            queue.joined = slot.joined
        queue.append(flight)
        flight.probe.landed = functools.partial(self._landed, slot)
        if not queue.confirming:
            queue.confirming = True
            self._pipeline.flow.spawn(self._confirm(slot), idles=True)

    def _landed(self, slot: ThreadSlot, probe: Probe) -> None:
        """A frame of a send in flight left: the sends at the head that have one are
        delivered, in order, at once (the confirmer only wakes for a timeout, or when the
        flight is over)."""
        queue = slot.flight
        home = queue.loop
        if home is not None and running_loop() is not home:  # (a frame from another thread)
            call_on(home, self._landed, slot, probe)
            return
        if not queue or queue[0].probe is not probe:  # (a later one: its turn comes)
            return
        self._land_heads(slot)

    def _land_heads(self, slot: ThreadSlot) -> None:
        """Record the sends at the head of the flight whose frame left, in order."""
        queue = slot.flight
        while queue and queue[0].probe.frames:
            done = queue.popleft()
            done.probe.landed = None
            done.probe.done()
            self._delivered(slot, done)
        queue.since = time.monotonic()
        if not queue:
            if queue.waiters:
                queue.land()
            if slot.backlog:  # (a synchronous send kept behind the flight)
                self._pipeline.flow.schedule(slot)

    async def _confirm(self, slot: ThreadSlot) -> None:
        """Sleep until the oldest send in flight is overdue (past ``confirm`` seconds as the
        oldest, with no connection of the thread busy handling a message); an overdue send
        fails, with everything behind it. It sleeps on while sends come and land, and ends
        when it wakes to an empty flight (one task and one timer per ``confirm`` seconds, not
        per send)."""
        queue = slot.flight
        confirm = self._pipeline.delivery.confirm or 0.0
        try:
            while queue:
                if queue[0].probe.frames:  # (a frame whose landing was handed over to here)
                    self._land_heads(slot)
                    continue
                wait = queue.since + confirm - time.monotonic()
                if wait <= 0 and transport.busy(slot.owners, queue.since):
                    wait = confirm  # alive, handling what came before: wait on
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                await self._failed(slot)
        except asyncio.CancelledError:  # the guard closes, or the loop goes: keep them
            await self._failed(slot, "the guard closed before its delivery was confirmed")
            raise
        finally:
            queue.confirming = False
            queue.land()

    def _delivered(self, slot: ThreadSlot, flight: Flight) -> None:
        self._noted(slot, flight.seq, flight.sent, flight.probe, flight.started, flight.call.kind)
        if self._pipeline.tel.active:
            self._traced(slot, flight.seq, flight.sent, flight.started, flight.call.kind)

    async def _failed(self, slot: ThreadSlot, why: str | None = None) -> None:
        """The oldest send in flight was not confirmed: it and every later one not confirmed
        since are kept, in seq order (one failure for the thread's retry count)."""
        pipeline = self._pipeline
        flow, recorder, tel = pipeline.flow, pipeline.recorder, pipeline.tel
        flights = list(slot.flight)
        slot.flight.clear()
        reason = None
        for flight in flights:
            flight.probe.landed = None
            flight.probe.done()
            if flight.probe.frames:  # its frame left after all
                self._delivered(slot, flight)
                continue
            if reason is None:
                reason = why if why is not None else flow.failed(slot, UNCONFIRMED)
            recorder.seq_recorded()
            entry = flow.entry(slot, flight.seq, flight.sent, flight.call, True, time.time(), 1)
            started, kind = flight.started or None, flight.call.kind
            with tel.sending(slot.thread_id, flight.message, flight.seq, started, kind=kind):
                await flow.buffer(slot, entry, reason)

