"""What the guard keeps for one thread: its state, its seq counter and its line."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from emitguard._loops import Later, Signal, resolve
from emitguard.states import ConnectionState

__all__ = ["Flights", "ThreadSlot", "Ticket"]


class Ticket:
    """A place in a thread's line.

    ``future`` is resolved (on its own loop) when the line is handed to the ticket. ``keep`` is
    the work to do in the ticket's turn if its waiter is gone by then (a cancelled sender's
    event still has to be kept in order): ``None`` when there is nothing to keep.
    """

    __slots__ = ("future", "keep")

    def __init__(self, future: asyncio.Future[None] | None, keep: Any = None) -> None:
        self.future = future
        self.keep = keep

    @property
    def waiting(self) -> bool:
        """A live waiter will take the line when it is handed over."""
        return self.future is not None and not self.future.done()


class Flights(deque[Any]):
    """A thread's sends in flight (:mod:`emitguard._inflight`), oldest first."""

    __slots__ = ("confirming", "joined", "loop", "since", "waiters")

    def __init__(self) -> None:
        super().__init__()
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop the sends in flight were handed over on (their confirmer's)."""
        self.since = 0.0
        """``time.monotonic()`` when the oldest became the oldest (its confirmation's clock)."""
        self.joined = 0
        """The thread's ``joined`` count when the oldest was handed over."""
        self.confirming = False
        """The thread's confirmer task runs."""
        self.waiters: list[asyncio.Future[None]] = []
        """Waiting for the flight to end (:meth:`settled`)."""

    async def settled(self) -> None:
        """Wait until none of the thread's sends is in flight (now, usually)."""
        while self:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def land(self) -> None:
        """The flight ended: wake whoever waits for it (on their own loops)."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            resolve(waiter)


class ThreadSlot:
    """Everything the guard keeps for one thread.

    The *line* serialises everything that delivers to, buffers for or flushes the thread, so
    ``seq`` order is delivery order. ``line`` holds one token while the line is free: taking
    it is one ``list.pop()`` and giving it back one ``append()``, each a single atomic
    operation (under the GIL, and on free-threaded builds too), cheaper than a lock; nobody
    ever blocks on it. ``tickets`` are those waiting for the line, first come first served.
    The line's holder is the only writer of ``seq`` and of the thread's outbox.
    """

    __slots__ = (
        "backlog",
        "base",
        "failures",
        "flight",
        "flushing",
        "freed",
        "gate",
        "home",
        "joined",
        "line",
        "loop",
        "note",
        "owners",
        "parked",
        "ready",
        "retry",
        "retry_at",
        "seq",
        "state",
        "subscribers",
        "thread_id",
        "tickets",
        "timed_out",
        "warned",
    )

    def __init__(self, thread_id: Any, seq: int = 0) -> None:
        self.thread_id = thread_id
        self.state = ConnectionState.CONNECTING
        self.note: str | None = None
        """Why the thread is in its state (for DISCONNECTED and ERROR)."""
        self.seq = seq
        self.base = seq
        """The seq the slot started from (a thread met again after it was forgotten)."""
        self.backlog = 0
        """Entries of this thread in the outbox."""
        self.line: list[bool] = [True]
        self.tickets: deque[Ticket] = deque()
        self.ready: list[tuple[asyncio.Future[bool], bool]] = []
        """Barrier waiters (and whether each holds the line), resolved on association."""
        self.timed_out = False
        """A barrier wait timed out since the last association: later sends do not wait."""
        self.flushing = False
        """A flush of the thread is scheduled or running."""
        self.owners: set[object] = set()
        self.subscribers: list[Any] = []
        self.parked = 0
        """Line holders waiting on the readiness barrier (see ``Guard.hold``)."""
        self.gate: Signal | None = None
        """Set while a ``Guard.hold`` body runs ahead of a parked line holder."""
        self.failures = 0
        """Deliveries that failed in a row on the live association (retried with backoff)."""
        self.retry_at = 0.0
        """``time.monotonic()`` when the pending retry is due (to set its timer again when
        the loop it was set on closes: a private-loop flush)."""
        self.retry: Later | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        """The event loop of the last async send that buffered here: flushes run there."""
        self.warned = False
        """Its oldest buffered event was logged as past half its TTL (until the backlog
        empties)."""
        self.freed = False
        """Taken out of the thread table: anyone holding this object looks the thread up again."""
        self.flight = Flights()
        """Sends handed over, waiting for their confirmation (:mod:`emitguard._inflight`)."""
        self.joined = 0
        """Connections that started to carry the thread (counted: a new one makes a change)."""
        self.home: asyncio.AbstractEventLoop | None = None
        """The event loop of the thread's latest association made from async code."""

    def __repr__(self) -> str:
        return f"thread {self.thread_id}"

    @property
    def idle(self) -> bool:
        """Nothing here that the guard must remember: no association, nothing buffered, no
        one waiting or listening. (Whoever frees the slot also takes its line's token.)"""
        return (
            self.state is not ConnectionState.CONNECTED
            and not self.backlog
            and not self.owners
            and not self.subscribers
            and not self.flight
            and not self.ready
            and not self.tickets
            and not self.flushing
            and self.gate is None
        )

    def wake_ready(self, value: bool) -> int:
        """Resolve every barrier waiter with ``value``, each on its own loop. Returns how
        many of them held the line and are gone with their closed loop."""
        waiters, self.ready = self.ready, []
        dead = 0
        for future, holds_line in waiters:
            if not resolve(future, value) and holds_line:
                dead += 1
        return dead
