"""Per-thread bookkeeping: state, sequence counter and a FIFO line that serialises deliveries."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from emitguard.states import ConnectionState


class ThreadSlot:
    """Everything the guard keeps for one thread.

    The *line* is a first-in first-out lock: whoever holds it (``busy``) is the only one
    delivering to, buffering for or flushing this thread, so ``seq`` order is delivery order.
    Taking a free line costs two attribute writes; waiting uses futures of the running loop.
    """

    __slots__ = (
        "backlog",
        "busy",
        "flush_pending",
        "gate",
        "history",
        "history_floor",
        "note",
        "owners",
        "parked",
        "queue",
        "ready",
        "seq",
        "slow",
        "state",
        "subscribers",
        "thread_id",
        "timed_out",
    )

    def __init__(self, thread_id: str) -> None:
        self.thread_id = thread_id
        self.state = ConnectionState.CONNECTING
        self.seq = 0
        self.backlog = 0
        """Entries of this thread in the outbox."""
        self.busy = False
        self.slow = False
        """The line is held by a slow path (not by a hot-path send in flight)."""
        self.queue: deque[tuple[asyncio.Future[None], int | None]] | None = None
        """Tickets waiting for the line, with the seq of the emission each one carries."""
        self.ready: list[asyncio.Future[bool]] = []
        """Futures of barrier waiters, resolved on association."""
        self.timed_out = False
        """A barrier wait timed out since the last association: later sends do not wait."""
        self.flush_pending = False
        self.note: str | None = None
        """Why the thread is in its state (for DISCONNECTED and ERROR)."""
        self.owners: set[object] = set()
        self.parked = 0
        """Line holders waiting on the readiness barrier (see ``Guard.hold``)."""
        self.gate: asyncio.Future[None] | None = None
        """Set while a ``Guard.hold`` body runs ahead of a parked line holder."""
        self.history: deque[tuple[int, object]] | None = None
        """The last delivered (seq, message) pairs, oldest first (the ``history`` option)."""
        self.history_floor = 0
        """The highest seq that fell out of ``history``."""
        self.subscribers: list[Any] = []
        """Open :class:`~emitguard.subscriptions.Subscription` objects of the thread."""

    def remember(self, seq: int, message: object, size: int) -> None:
        """Keep a delivered message in the replay window of ``size`` messages."""
        history = self.history
        if history is None:
            history = self.history = deque()
        history.append((seq, message))
        while len(history) > size:
            self.history_floor = max(self.history_floor, history.popleft()[0])

    def __repr__(self) -> str:
        return f"thread {self.thread_id}"

    def take(self, seq: int | None = None) -> asyncio.Future[None] | None:
        """Take the line if free (returns ``None``), else join it and return the ticket.

        ``seq`` is the emission the ticket carries (``None`` for a flush): flushes never
        deliver past the oldest emission still waiting in line.
        """
        if not self.busy:
            self.busy = self.slow = True
            return None
        if self.queue is None:
            self.queue = deque()
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((ticket, seq))
        return ticket

    def first_waiting(self) -> int | None:
        """The seq of the oldest emission waiting in line, if any."""
        for ticket, seq in self.queue or ():
            if seq is not None and not ticket.done():
                return seq
        return None

    def reset_line(self) -> None:
        """Free the line whatever holds it (its holder's event loop is gone)."""
        self.busy = self.slow = False
        self.queue = None

    def hand_on(self) -> bool:
        """Pass the line to the next live ticket; False (and the line is free) when none."""
        queue = self.queue
        while queue:
            ticket, _ = queue.popleft()
            if ticket.done():
                continue
            try:
                ticket.set_result(None)
            except RuntimeError:  # its event loop is closed: that waiter is gone
                continue
            self.slow = True  # every ticket holder is a slow path
            return True
        self.busy = False
        self.slow = False
        return False

    def wake_ready(self, value: bool) -> None:
        """Resolve every barrier waiter with ``value``."""
        waiters, self.ready = self.ready, []
        for future in waiters:
            if future.done():
                continue
            loop = future.get_loop()
            if loop.is_closed():
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                future.set_result(value)
            else:
                loop.call_soon_threadsafe(_resolve, future, value)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
