"""The thread table: every thread the guard knows, who carries it, and its state.

A thread's slot is made on first use. Once idle (no association, nothing buffered, nobody
waiting, listening or holding its line) it joins a list of idle slots, and past ``idle_limit``
the longest idle are freed, so the table holds the live threads and a bounded number of
recently idle ones, not every thread ever seen. The table's ``mutex`` guards its structure
and the lines' waiting lists; it is held only for short bookkeeping, never across a send.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from emitguard._line import KeepWork, Lines, take
from emitguard._slot import ThreadSlot, Ticket
from emitguard.states import ConnectionState

__all__ = ["ThreadTable", "owner_key"]

StateListener = Callable[[Any, ConnectionState, ConnectionState], None]
"""``listener(thread_id, old, new)``."""


class ThreadTable:
    """Slots by thread id, the owners index, state transitions and the lines."""

    def __init__(
        self,
        keep: KeepWork,
        on_state: StateListener,
        first_seq: Callable[[Any], int] | None = None,
        idle_limit: int = 1000,
    ) -> None:
        self.mutex = threading.RLock()
        self.lines = Lines(self.mutex, keep)
        self.slots: dict[Any, ThreadSlot] = {}
        self._owners: dict[object, set[Any]] = {}
        self._on_state = on_state
        self._first_seq = first_seq
        self._idle: OrderedDict[Any, ThreadSlot] = OrderedDict()
        """Slots that were idle when last looked at, oldest first (a candidate list: each is
        looked at again before it is freed)."""
        self.idle_limit = idle_limit
        self.retired = 0
        """Seqs given out in slots freed since (so counts stay exact)."""

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, thread_id: Any) -> ThreadSlot | None:
        """The thread's slot, if the guard holds one."""
        return self.slots.get(thread_id)

    def slot(self, thread_id: Any) -> ThreadSlot:
        """The thread's slot, made on first use."""
        slot = self.slots.get(thread_id)
        if slot is not None:
            return slot
        with self.mutex:
            slot = self.slots.get(thread_id)
            if slot is None:
                seq = self._first_seq(thread_id) if self._first_seq is not None else 0
                slot = self.slots[thread_id] = ThreadSlot(thread_id, seq)
            return slot

    def take(
        self, thread_id: Any, keep: Any = None, *, wait: bool = True
    ) -> tuple[ThreadSlot, Ticket | None]:
        """The thread's slot and its line: ``(slot, None)`` when the line is ours, else a
        ticket to wait with (see :meth:`Lines.join`)."""
        with self.mutex:
            slot = self.slot(thread_id)
            ticket, pass_on = self.lines.join(slot, keep, wait=wait)
        if pass_on:
            self.lines.release(slot)
        return slot, ticket

    def join(self, slot: ThreadSlot) -> Ticket | None:
        """:meth:`take` for a slot in hand (one the caller knows is not freed: it has
        entries, or the caller keeps it busy)."""
        with self.mutex:
            ticket, pass_on = self.lines.join(slot)
        if pass_on:
            self.lines.release(slot)
        return ticket

    def try_take(self, slot: ThreadSlot) -> bool:
        """Take the thread's line if it is free and nobody waits for it."""
        with self.mutex:
            return not slot.freed and not slot.tickets and take(slot)

    def release(self, slot: ThreadSlot) -> None:
        """Give up the thread's line, and free the slot if nothing is left in it."""
        self.lines.release(slot)
        if slot.state is not ConnectionState.CONNECTED:
            self.settled(slot)

    def settled(self, slot: ThreadSlot) -> None:
        """Something of the thread ended (a disconnect, its last buffered event, its line):
        if it is idle now, it joins the idle list, and the longest idle beyond
        ``idle_limit`` are forgotten. Amortised O(1)."""
        if not slot.idle or slot.freed:
            return
        with self.mutex:
            self._idle[slot.thread_id] = slot
            self._idle.move_to_end(slot.thread_id)
            while len(self._idle) > self.idle_limit:
                _, oldest = self._idle.popitem(last=False)
                self._free(oldest)

    def _free(self, slot: ThreadSlot) -> bool:
        """Forget a thread that is still idle (its line's token is taken for good, so anyone
        holding this slot object looks the thread up again). Under the mutex."""
        if slot.freed or not slot.idle or slot.tickets or not take(slot):
            return False
        slot.freed = True
        if self.slots.get(slot.thread_id) is slot:
            del self.slots[slot.thread_id]
        self.retired += slot.seq - slot.base
        return True

    def set_state(self, slot: ThreadSlot, new: ConnectionState, note: str | None) -> None:
        """Move the thread to ``new`` (the listener hears of real changes only)."""
        slot.note = note
        old = slot.state
        if old is new:
            return
        slot.state = new
        self._on_state(slot.thread_id, old, new)

    # ------------------------------------------------------------------ owners

    def own(self, slot: ThreadSlot, owner: object) -> None:
        """``owner`` (a user, a connection) carries the thread."""
        key = owner_key(owner)
        with self.mutex:
            if key not in slot.owners:
                slot.joined += 1
            slot.owners.add(key)
            self._owners.setdefault(key, set()).add(slot.thread_id)

    def disown(self, slot: ThreadSlot) -> None:
        """No owner carries the thread any more."""
        with self.mutex:
            for key in slot.owners:
                threads = self._owners.get(key)
                if threads is not None:
                    threads.discard(slot.thread_id)
                    if not threads:
                        del self._owners[key]
            slot.owners.clear()

    def leave(self, slot: ThreadSlot, owner: object) -> bool:
        """``owner`` no longer carries this one thread (it still carries its others); True
        when it did carry it."""
        key = owner_key(owner)
        with self.mutex:
            if key not in slot.owners:
                return False
            slot.owners.discard(key)
            threads = self._owners.get(key)
            if threads is not None:
                threads.discard(slot.thread_id)
                if not threads:
                    del self._owners[key]
            return True

    def carried(self, owner: object) -> list[ThreadSlot]:
        """The slots of the threads ``owner`` carries, as they are now (no lock: called for
        every frame a transport sends; a copy of the set is one atomic step)."""
        threads = self._owners.get(owner_key(owner))
        if not threads:
            return []
        slots = self.slots
        return [slot for t in tuple(threads) if (slot := slots.get(t)) is not None]

    def owner_gone(self, owner: object) -> list[ThreadSlot]:
        """``owner`` went away: forget it; the slots of the threads it carried, oldest
        association order not implied (sorted by repr for a stable order)."""
        key = owner_key(owner)
        with self.mutex:
            threads = self._owners.pop(key, set())
            slots = [self.slots[t] for t in threads if t in self.slots]
            for slot in slots:
                slot.owners.discard(key)
        return sorted(slots, key=lambda slot: repr(slot.thread_id))



def owner_key(owner: object) -> object:
    """A dictionary key for an owner, also for unhashable ones (keyed by identity)."""
    try:
        hash(owner)
    except TypeError:
        return ("unhashable owner", id(owner))
    return owner
