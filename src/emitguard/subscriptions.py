"""Subscriptions: readers of a thread's deliveries that are not the manager's sockets.

A fallback transport (Server-Sent Events, say) subscribes to a thread with
:meth:`emitguard.Guard.subscribe`. While it is open the subscription counts as a live
connection of the thread: every delivery of the thread is also handed to it (with its seq),
a delivery that reached a subscription counts as delivered even when the manager's own send
found no socket, and the thread is disconnected when the last carrier goes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["Subscription"]


class Subscription:
    """An async iterator of ``(seq, message)`` for one thread; ``close()`` ends it.

    It holds at most ``maxsize`` undelivered items: a reader that falls that far behind is
    closed (its client reconnects and resumes from its last seq) rather than buffered forever.
    """

    __slots__ = (
        "_items",
        "_on_close",
        "_waiter",
        "closed",
        "epoch",
        "maxsize",
        "reason",
        "thread_id",
    )

    def __init__(
        self, thread_id: Hashable, maxsize: int, on_close: Callable[[Subscription], None]
    ) -> None:
        self.thread_id = thread_id
        self.maxsize = maxsize
        self.closed = False
        self.reason: str | None = None
        """Why it was closed."""
        self.epoch: str | None = None
        """With a shared backend (Redis), the epoch of the seqs it carries (set by whoever
        opened it from its replay, or by its first delivery); a delivery of another epoch
        closes it, so that its client resumes against the new one and is told to resync.
        ``None`` in memory."""
        self._items: deque[tuple[int, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_close = on_close

    def __repr__(self) -> str:
        state = f"closed: {self.reason}" if self.closed else f"{len(self._items)} waiting"
        return f"<Subscription {self.thread_id} ({state})>"

    def offer(self, seq: int, message: Any) -> bool:
        """Hand over one delivery; False when closed or full (which closes it)."""
        if self.closed:
            return False
        if len(self._items) >= self.maxsize:
            self.close(f"fell {self.maxsize} messages behind")
            return False
        self._items.append((seq, message))
        self._wake()
        return True

    def close(self, reason: str = "closed") -> None:
        """End the subscription; the iterator stops after the items already handed over."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self._wake()
        self._on_close(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[int, Any]:
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()
