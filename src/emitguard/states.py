"""The two enums of the behaviour contract: thread states and emission outcomes."""

from __future__ import annotations

import enum

__all__ = ["ConnectionState", "Outcome"]


class ConnectionState(str, enum.Enum):
    """Where a thread stands, as far as the guard knows.

    ``CONNECTING``
        Never associated since the guard started. Sends wait on the readiness barrier.
    ``CONNECTED``
        Associated, and the last delivery worked. Sends go straight to the original.
    ``DISCONNECTED``
        A delivery failed or the owner went away. Sends are buffered at once.
    ``ERROR``
        The association call raised. Sends are buffered at once.
    """

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    ERROR = "error"


class Outcome(str, enum.Enum):
    """What became of one emission.

    Every outcome but ``BUFFERED`` is terminal: an emission ends in exactly one of them.
    ``BUFFERED`` says the emission entered the outbox; it is followed later by ``FLUSHED``,
    ``DROPPED``, ``EXPIRED`` or ``FAILED``. ``PASSED`` is a send that named no thread (a
    broadcast): handed to the original unchanged, outside any thread's order (``seq`` 0).
    """

    DELIVERED = "delivered"
    FLUSHED = "flushed"
    BUFFERED = "buffered"
    DROPPED = "dropped"
    EXPIRED = "expired"
    FAILED = "failed"
    REJECTED = "rejected"
    PASSED = "passed"

    @property
    def terminal(self) -> bool:
        """True for every outcome but ``BUFFERED``."""
        return self is not Outcome.BUFFERED

    @property
    def ok(self) -> bool:
        """True when the event reached, or is still on its way to, its thread."""
        return self in _OK


_OK = frozenset({Outcome.DELIVERED, Outcome.FLUSHED, Outcome.BUFFERED, Outcome.PASSED})
