"""emitguard: no lost WebSocket events.

Guard a connection manager's ``send_to_thread`` so that an event sent before the thread is
associated, or while its connection is gone, waits or is buffered and then delivered in order,
and every event ends in one recorded outcome.

    import emitguard
    guard = emitguard.guard(manager, disconnect="disconnect_user")

Everything an application uses is exported here; what only adapter authors need lives in
:mod:`emitguard.extending`.
"""

from __future__ import annotations

from emitguard._history import Replay
from emitguard._version import __version__ as __version__
from emitguard.api import Adapted, guard, guarded, unguard
from emitguard.engine import Guard, live_guards
from emitguard.errors import AdapterError, EmissionError
from emitguard.hooks import hookimpl, register, unregister
from emitguard.options import GuardOptions
from emitguard.outbox import MemoryOutbox, Outbox, OutboxEntry
from emitguard.records import Emission
from emitguard.states import ConnectionState, Outcome
from emitguard.stats import GuardStats
from emitguard.subscriptions import Subscription

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
    "Replay",
    "Subscription",
    "guard",
    "guarded",
    "hookimpl",
    "live_guards",
    "register",
    "unguard",
    "unregister",
]
