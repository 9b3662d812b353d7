"""Snapshots of a guard's counters."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from emitguard.states import ConnectionState, Outcome

__all__ = ["GuardStats"]


@dataclass(frozen=True)
class GuardStats:
    """A snapshot of a guard's counters (exact whenever no send is in flight)."""

    outcomes: Mapping[Outcome, int]
    """How many records of each outcome the guard has made."""
    pending: Mapping[Hashable, int]
    """Buffered emissions per thread (threads with none are left out)."""
    states: Mapping[Hashable, ConnectionState] = field(default_factory=dict)
    """The state of every thread the guard holds."""
    waiting: Mapping[Hashable, int] = field(default_factory=dict)
    """Events handed over that wait for their turn in their thread's line with no sender
    awaiting them (a synchronous send made while the line was busy, a cancelled sender's
    event); each gets its records in its turn. Threads with none are left out."""
    backend: Mapping[str, object] = field(default_factory=dict)
    """The state of a shared backend (empty for the memory outbox). Redis: ``redis`` ("up" or
    "down"), ``down_for`` (seconds), ``local`` (sends waiting in the local buffer for Redis,
    no seq yet; also counted in ``pending``), ``delivering`` (threads connected here)."""
    in_flight: Mapping[Hashable, int] = field(default_factory=dict)
    """Sends handed over whose confirmation has not come yet (a transport that tags its
    messages lets several of a thread be in flight at once: :func:`emitguard.transport.tag`),
    per thread; each gets its record when its frame leaves, or is kept. Threads with none
    are left out. Until then ``outcomes`` counts them as delivered."""

    @property
    def passed_through(self) -> int:
        """Sends that named no thread (broadcasts), handed to the original unchanged."""
        return self.outcomes.get(Outcome.PASSED, 0)

    @property
    def pending_total(self) -> int:
        """Buffered emissions over all threads."""
        return sum(self.pending.values())
