"""The outbox: a per-thread, seq-ordered buffer of emissions that could not be delivered yet.

:class:`Outbox` is the small async contract a backend implements; :class:`MemoryOutbox` is the
in-process reference implementation and the default. The engine owns every policy (bounds,
overflow, protection, TTL): a backend only stores, orders and removes entries, so a Redis
Streams backend maps each method onto one or two commands (see ``docs/concepts.md``).
"""

from __future__ import annotations

import abc
import bisect
import dataclasses
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Hashable
from typing import Any

__all__ = ["MemoryOutbox", "Outbox", "OutboxEntry"]

Deliver = Callable[[Any], Any]
"""Calls the original send for one message; returns its result (an awaitable if async)."""


@dataclasses.dataclass(slots=True, eq=False)
class OutboxEntry:
    """One buffered emission."""

    thread_id: Hashable
    seq: int
    message: Any
    event_type: str | None
    created: float
    """``time.monotonic()`` of the send call (TTL and buffer time are measured from it)."""
    created_at: float
    """``time.time()`` of the send call."""
    deliver: Deliver | None = None
    """How to hand the message to the original send. ``None`` (data read back from a store
    that cannot keep callables): the flush records it FAILED, "no send to deliver it with"."""
    is_async: bool = True
    """Whether ``deliver`` returns an awaitable."""
    attempts: int = 0
    waited: float = 0.0
    buffered: float = 0.0
    """``time.monotonic()`` when it entered the outbox."""
    link: Any = None
    """The OpenTelemetry ``SpanContext`` of the span that buffered it (its flush links to it);
    a network backend may store it as a W3C ``traceparent``."""
    loop: Any = None
    """The event loop of the async send that made it: while that loop runs, the entry is
    delivered there (``None`` for a synchronous send, or data from another process)."""


class Outbox(abc.ABC):
    """Storage contract for buffered emissions.

    Entries of one thread are kept in ``seq`` order. Methods are coroutines so that a network
    backend fits; a backend whose coroutines never suspend sets ``synchronous = True`` and the
    engine may then drive them from synchronous code (sync sends, :meth:`Guard.stats`).
    """

    synchronous: bool = False
    shared: bool = False
    """True for a backend shared by several processes that gives out the seq itself (the
    Redis backend): the guard then routes every send through it (``emitguard._relay``)."""

    def check(self, message: Any) -> str | None:
        """Why ``message`` cannot be stored, or ``None`` when it can."""
        if message is None:
            return "message is None"
        if inspect.isawaitable(message):
            return "message is an awaitable (was a coroutine passed instead of its result?)"
        return None

    @abc.abstractmethod
    async def push(self, entry: OutboxEntry) -> None:
        """Store ``entry`` in its thread, in ``seq`` order (usually at the end)."""

    @abc.abstractmethod
    async def head(self, thread_id: Hashable) -> OutboxEntry | None:
        """The oldest entry of a thread, without removing it."""

    @abc.abstractmethod
    async def remove(self, thread_id: Hashable, seq: int) -> bool:
        """Remove one entry (after delivery); False when it was not there."""

    @abc.abstractmethod
    async def evict_oldest(
        self,
        thread_id: Hashable | None,
        protect: Collection[str],
        in_flight: Collection[tuple[str, int]] = (),
    ) -> OutboxEntry | None:
        """Remove and return the oldest entry (the one in the outbox longest) whose event type
        is not protected and which is not being delivered right now (``(thread_id, seq)`` in
        ``in_flight``).

        ``thread_id=None`` looks at every thread (the global bound).
        """

    @abc.abstractmethod
    async def expire(self, thread_id: Hashable, created_before: float) -> list[OutboxEntry]:
        """Remove and return the thread's entries created before ``created_before``
        (``time.monotonic()`` clock)."""

    @abc.abstractmethod
    async def entries(self, thread_id: Hashable) -> list[OutboxEntry]:
        """Every entry of a thread, oldest first (for inspection and reports)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default does nothing."""


class MemoryOutbox(Outbox):
    """In-process outbox: one list per thread, ordered by ``seq``, and every entry in the
    order it came in, so that evicting the oldest for the global bound costs amortised O(1)."""

    synchronous = True

    def __init__(self) -> None:
        self._threads: dict[Any, list[OutboxEntry]] = {}
        self._arrivals: deque[OutboxEntry] = deque()
        """Every entry in the order it came in (and some that left since: skipped)."""
        self._size = 0

    def __len__(self) -> int:
        return self._size

    async def push(self, entry: OutboxEntry) -> None:
        items = self._threads.setdefault(entry.thread_id, [])
        if not items or items[-1].seq < entry.seq:
            items.append(entry)
        else:
            bisect.insort(items, entry, key=_seq)
        self._size += 1
        self._arrivals.append(entry)

    async def head(self, thread_id: Any) -> OutboxEntry | None:
        items = self._threads.get(thread_id)
        return items[0] if items else None

    async def remove(self, thread_id: Any, seq: int) -> bool:
        items = self._threads.get(thread_id)
        if not items:
            return False
        index = bisect.bisect_left(items, seq, key=_seq)
        if index == len(items) or items[index].seq != seq:
            return False
        del items[index]
        self._removed(thread_id, items, 1)
        return True

    def _removed(self, thread_id: Any, items: list[OutboxEntry], count: int) -> None:
        self._size -= count
        if not items:
            del self._threads[thread_id]
        if len(self._arrivals) > 2 * self._size + 64:  # mostly gone: rebuild, amortised O(1)
            self._arrivals = deque(entry for entry in self._arrivals if self._holds(entry))

    def _holds(self, entry: OutboxEntry) -> bool:
        items = self._threads.get(entry.thread_id)
        if not items:
            return False
        index = bisect.bisect_left(items, entry.seq, key=_seq)
        return index < len(items) and items[index] is entry

    async def evict_oldest(
        self,
        thread_id: Any | None,
        protect: Collection[str],
        in_flight: Collection[tuple[Any, int]] = (),
    ) -> OutboxEntry | None:
        victim = self._oldest_of(thread_id, protect, in_flight)
        if victim is not None:
            await self.remove(victim.thread_id, victim.seq)
        return victim

    def _oldest_of(
        self,
        thread_id: Any | None,
        protect: Collection[str],
        in_flight: Collection[tuple[Any, int]],
    ) -> OutboxEntry | None:
        def evictable(entry: OutboxEntry) -> bool:
            return entry.event_type not in protect and (entry.thread_id, entry.seq) not in in_flight

        if thread_id is not None:
            return next((e for e in self._threads.get(thread_id, ()) if evictable(e)), None)
        skipped: list[OutboxEntry] = []
        victim = None
        arrivals = self._arrivals
        while arrivals:
            entry = arrivals.popleft()
            if not self._holds(entry):
                continue  # it left the outbox already
            if evictable(entry):
                victim = entry
                break
            skipped.append(entry)
        arrivals.extendleft(reversed(skipped))
        return victim

    async def expire(self, thread_id: Any, created_before: float) -> list[OutboxEntry]:
        items = self._threads.get(thread_id)
        if not items:
            return []
        cut = 0
        while cut < len(items) and items[cut].created < created_before:
            cut += 1
        gone = items[:cut]
        del items[:cut]
        if gone:
            self._removed(thread_id, items, len(gone))
        return gone

    async def entries(self, thread_id: Any) -> list[OutboxEntry]:
        return list(self._threads.get(thread_id, ()))


def _seq(entry: OutboxEntry) -> int:
    return entry.seq


def drive(awaitable: Awaitable[Any]) -> Any:
    """Run a coroutine that never suspends to its end, synchronously.

    Used with a ``synchronous`` outbox from synchronous code; raises :class:`RuntimeError`
    if the coroutine does suspend.
    """
    coro = awaitable.__await__()
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a synchronous outbox operation suspended")
