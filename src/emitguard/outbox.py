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
from collections.abc import Awaitable, Callable, Collection
from typing import Any

__all__ = ["MemoryOutbox", "Outbox", "OutboxEntry"]

Deliver = Callable[[Any], Any]
"""Calls the original send for one message; returns its result (an awaitable if async)."""


@dataclasses.dataclass(slots=True, eq=False)
class OutboxEntry:
    """One buffered emission."""

    thread_id: str
    seq: int
    message: Any
    event_type: str | None
    created: float
    """``time.monotonic()`` of the send call (TTL and buffer time are measured from it)."""
    created_at: float
    """``time.time()`` of the send call."""
    deliver: Deliver | None = None
    """How to hand the message to the original send; ``None`` for a backend that stores
    only data (the guard's default delivery is used then)."""
    is_async: bool = True
    """Whether ``deliver`` returns an awaitable."""
    attempts: int = 0
    waited: float = 0.0
    buffered: float = 0.0
    """``time.monotonic()`` when it entered the outbox."""
    link: Any = None
    """The OpenTelemetry ``SpanContext`` of the span that buffered it (its flush links to it);
    a network backend may store it as a W3C ``traceparent``."""


class Outbox(abc.ABC):
    """Storage contract for buffered emissions.

    Entries of one thread are kept in ``seq`` order. Methods are coroutines so that a network
    backend fits; a backend whose coroutines never suspend sets ``synchronous = True`` and the
    engine may then drive them from synchronous code (sync sends, :meth:`Guard.stats`).
    """

    synchronous: bool = False

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
    async def head(self, thread_id: str) -> OutboxEntry | None:
        """The oldest entry of a thread, without removing it."""

    @abc.abstractmethod
    async def remove(self, thread_id: str, seq: int) -> bool:
        """Remove one entry (after delivery); False when it was not there."""

    @abc.abstractmethod
    async def evict_oldest(
        self,
        thread_id: str | None,
        protect: Collection[str],
        in_flight: Collection[tuple[str, int]] = (),
    ) -> OutboxEntry | None:
        """Remove and return the oldest entry whose event type is not protected and which is
        not being delivered right now (``(thread_id, seq)`` in ``in_flight``).

        ``thread_id=None`` looks at every thread (the global bound).
        """

    @abc.abstractmethod
    async def expire(self, thread_id: str, created_before: float) -> list[OutboxEntry]:
        """Remove and return the thread's entries created before ``created_before``
        (``time.monotonic()`` clock)."""

    @abc.abstractmethod
    async def entries(self, thread_id: str) -> list[OutboxEntry]:
        """Every entry of a thread, oldest first (for inspection and reports)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default does nothing."""


class MemoryOutbox(Outbox):
    """In-process outbox: one list per thread, ordered by ``seq``."""

    synchronous = True

    def __init__(self) -> None:
        self._threads: dict[str, list[OutboxEntry]] = {}

    async def push(self, entry: OutboxEntry) -> None:
        items = self._threads.setdefault(entry.thread_id, [])
        if not items or items[-1].seq < entry.seq:
            items.append(entry)
        else:
            bisect.insort(items, entry, key=_seq)

    async def head(self, thread_id: str) -> OutboxEntry | None:
        items = self._threads.get(thread_id)
        return items[0] if items else None

    async def remove(self, thread_id: str, seq: int) -> bool:
        items = self._threads.get(thread_id)
        if not items:
            return False
        index = bisect.bisect_left(items, seq, key=_seq)
        if index == len(items) or items[index].seq != seq:
            return False
        del items[index]
        if not items:
            del self._threads[thread_id]
        return True

    async def evict_oldest(
        self,
        thread_id: str | None,
        protect: Collection[str],
        in_flight: Collection[tuple[str, int]] = (),
    ) -> OutboxEntry | None:
        pools = [thread_id] if thread_id is not None else list(self._threads)
        victim: OutboxEntry | None = None
        for name in pools:
            for entry in self._threads.get(name, ()):
                if entry.event_type not in protect and (name, entry.seq) not in in_flight:
                    if victim is None or entry.created < victim.created:
                        victim = entry
                    break
        if victim is not None:
            await self.remove(victim.thread_id, victim.seq)
        return victim

    async def expire(self, thread_id: str, created_before: float) -> list[OutboxEntry]:
        items = self._threads.get(thread_id)
        if not items:
            return []
        cut = 0
        while cut < len(items) and items[cut].created < created_before:
            cut += 1
        gone = items[:cut]
        del items[:cut]
        if not items:
            del self._threads[thread_id]
        return gone

    async def entries(self, thread_id: str) -> list[OutboxEntry]:
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
