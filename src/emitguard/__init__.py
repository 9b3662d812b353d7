"""emitguard: no lost WebSocket events.

Guard a connection manager's ``send_to_thread`` so that an event sent before the thread is
associated, or while its connection is gone, waits or is buffered and then delivered in order,
and every event ends in one recorded outcome.

    import emitguard
    guard = emitguard.guard(manager, disconnect="disconnect_user")
"""

from __future__ import annotations

from emitguard._version import __version__ as __version__
from emitguard.api import Adapted, guard, guarded, unguard
from emitguard.errors import AdapterError, EmissionError
from emitguard.guard import Guard, live_guards
from emitguard.hooks import hookimpl, register, unregister
from emitguard.options import GuardOptions
from emitguard.outbox import MemoryOutbox, Outbox, OutboxEntry
from emitguard.records import Emission
from emitguard.states import ConnectionState, Outcome
from emitguard.stats import GuardStats

__all__ = [
    "Adapted",
    "AdapterError",
    "ConnectionState",
    "Emission",
    "EmissionError",
    "Guard",
    "GuardOptions",
    "GuardStats",
    "MemoryOutbox",
    "Outbox",
    "OutboxEntry",
    "Outcome",
    "guard",
    "guarded",
    "hookimpl",
    "live_guards",
    "register",
    "unguard",
    "unregister",
]
