"""A thread's line: first come, first served, across event loops and OS threads.

Whoever holds a thread's line is the only one delivering to, buffering for or flushing that
thread. Taking a free line is one atomic ``list.pop()`` of its token (:func:`take`); nobody
ever blocks on it. Those who find it held wait with a :class:`~emitguard._slot.Ticket`: a future of
their own loop, resolved on that loop when the line is handed to them. A waiter that is gone
when its turn comes (cancelled, or its loop closed) leaves its ``keep`` work, which runs in
its place, in order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from emitguard._loops import call_on
from emitguard._slot import ThreadSlot, Ticket

__all__ = ["Lines", "take"]


def take(slot: ThreadSlot) -> bool:
    """Take the thread's line if it is free (its token, atomically)."""
    try:
        slot.line.pop()
    except IndexError:
        return False
    return True

KeepWork = Callable[[ThreadSlot, Ticket], bool]
"""``keep(slot, ticket)`` runs a gone waiter's work while the caller holds the line; True when
done (the caller still holds the line), False when a task took the line over to finish it."""


class Lines:
    """Takes, hands on and gives up the lines of one guard's threads."""

    def __init__(self, mutex: threading.RLock, keep: KeepWork) -> None:
        self.mutex = mutex
        self._keep = keep

    def join(
        self, slot: ThreadSlot, keep: Any = None, *, wait: bool = True
    ) -> tuple[Ticket | None, bool]:
        """Take the line, or get a ticket for it. Call under the mutex.

        Returns ``(None, False)`` when the line is yours now, else ``(ticket, pass_on)``:
        await ``ticket.future`` for your turn. ``pass_on``: the holder left between our look
        and our append, so the line is ours to hand on: call :meth:`release` right after,
        outside the mutex. ``wait=False`` (synchronous code): the ticket has no future; its
        ``keep`` work runs in its turn, done by whoever hands the line on.
        """
        if not slot.tickets and take(slot):
            return None, False
        future = asyncio.get_running_loop().create_future() if wait else None
        ticket = Ticket(future, keep)
        slot.tickets.append(ticket)
        return ticket, take(slot)

    def release(self, slot: ThreadSlot) -> None:
        """Give up the line: to the next waiter, after the work of any gone ones."""
        while True:
            with self.mutex:
                if slot.line:  # its token is back: the caller does not hold the line (a
                    return  # holder that died with its loop, reset since, leaving late)
                ticket = self._pop(slot)
                if ticket is None:
                    slot.line.append(True)
                    return
                if ticket.future is not None and self._grant(slot, ticket):
                    return
            if ticket.keep is not None and not self._keep(slot, ticket):
                return  # a task holds the line now and releases it when done

    def recheck(self, slot: ThreadSlot) -> None:
        """After the line was released without a look at the waiters: serve any that came."""
        if slot.tickets and take(slot):
            self.release(slot)

    @staticmethod
    def _pop(slot: ThreadSlot) -> Ticket | None:
        while slot.tickets:
            ticket = slot.tickets.popleft()
            if ticket.waiting or ticket.keep is not None:
                return ticket
        return None

    def _grant(self, slot: ThreadSlot, ticket: Ticket) -> bool:
        """Hand the line to a waiting ticket, on its loop; False when that loop is gone."""
        future = ticket.future
        assert future is not None
        return call_on(future.get_loop(), self._granted, slot, ticket)

    def _granted(self, slot: ThreadSlot, ticket: Ticket) -> None:
        """On the ticket's loop: wake its waiter, or do its work if it is gone meanwhile."""
        future = ticket.future
        assert future is not None
        if not future.done():
            future.set_result(None)
            return
        if ticket.keep is None or self._keep(slot, ticket):
            self.release(slot)
