"""The replay window: the last delivered messages of each thread, for clients that come back.

Each thread keeps at most ``size`` messages; all threads together keep at most ``total``.
Past that, the thread written to least recently loses its oldest messages first (an LRU over
threads), so the window's memory does not grow with the number of threads ever seen. A thread
whose messages all fell out is forgotten, and a client that asks it for more than it holds is
told to resynchronise, never given a silent gap.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

__all__ = ["Replay", "ReplayWindow"]


@dataclass(frozen=True)
class Replay:
    """What :meth:`emitguard.Guard.replay` found for a reconnecting client."""

    messages: list[tuple[int, Any]]
    """The (seq, message) pairs delivered after the client's last seq, oldest first."""
    complete: bool
    """False when the window no longer holds everything the client missed (or the client
    claims a seq the guard never gave): the client must resynchronise."""
    latest: int
    """The thread's latest seq."""
    epoch: str | None = None
    """The epoch of the thread's seq space (a shared backend; ``None`` in memory): a client
    keeps ``(epoch, seq)`` and a replay against another epoch is never complete."""


class _Kept:
    __slots__ = ("floor", "latest", "messages")

    def __init__(self) -> None:
        self.messages: deque[tuple[int, Any]] = deque()
        self.floor = 0
        """The highest seq that fell out of the window."""
        self.latest = 0


class ReplayWindow:
    """Delivered messages per thread, bounded per thread and in total."""

    def __init__(self, size: int, total: int) -> None:
        self.size = size
        self.total = total
        self._threads: OrderedDict[Any, _Kept] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Messages held over all threads."""
        return self._count

    def threads(self) -> int:
        """Threads with something held."""
        return len(self._threads)

    def remember(self, thread_id: Any, seq: int, message: Any) -> None:
        """Keep a delivered message."""
        with self._lock:
            threads = self._threads
            kept = threads.get(thread_id)
            if kept is None:
                kept = threads[thread_id] = _Kept()
                self._count += 1
            else:
                threads.move_to_end(thread_id)
                messages = kept.messages
                if len(messages) < self.size:
                    self._count += 1
                else:  # full: its oldest falls out (one in, one out)
                    gone = messages[0][0]
                    messages.popleft()
                    if gone > kept.floor:
                        kept.floor = gone
            kept.messages.append((seq, message))
            if seq > kept.latest:
                kept.latest = seq
            if self._count > self.total:
                self._trim()

    def _trim(self) -> None:
        """Past ``total``: the threads written to least recently lose their oldest first."""
        threads = self._threads
        while self._count > self.total:
            oldest, victim = next(iter(threads.items()))
            self._drop_oldest(oldest, victim)

    def _drop_oldest(self, thread_id: Any, kept: _Kept) -> None:
        seq, _ = kept.messages.popleft()
        kept.floor = max(kept.floor, seq)
        self._count -= 1
        if not kept.messages:
            del self._threads[thread_id]

    def latest(self, thread_id: Any) -> int:
        """The last seq the window holds for the thread (0: none), so that a thread the
        guard forgot and meets again goes on counting where its clients left off."""
        kept = self._threads.get(thread_id)
        return kept.latest if kept is not None else 0

    def replay(self, thread_id: Any, after: int, latest: int) -> Replay:
        """What a client that last saw ``after`` missed; ``latest`` is the thread's seq."""
        with self._lock:
            kept = self._threads.get(thread_id)
            if kept is None:
                return Replay([], complete=after == latest, latest=latest)
            missed = [(seq, message) for seq, message in kept.messages if seq > after]
            return Replay(missed, complete=kept.floor <= after <= latest, latest=latest)
