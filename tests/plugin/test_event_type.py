"""The event type as an argument of the send (``emit(event, data, room)``): the ledger, the
spans and ``protect`` read it (issue 15: ``assert_delivered`` said "delivered: None")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from emitguard import Guard
from pytest_emitguard._ledger import EmissionLedger


class Rooms:
    """A Socket.IO-like server: the event type is the first argument, the room a keyword."""

    def __init__(self) -> None:
        self.rooms: dict[str, set[str]] = {}
        self.sent: list[tuple[str, str, Any]] = []

    def join(self, sid: str, room: str) -> None:
        self.rooms.setdefault(room, set()).add(sid)

    async def emit(self, event: str, data: Any = None, room: str | None = None) -> bool:
        if room is None or not self.rooms.get(room):
            return False
        self.sent.append((room, event, data))
        return True


ROLES = {
    "send": "emit",
    "associate": "join",
    "thread_param": "room",
    "message_param": "data",
    "event_type": "event",
}


async def test_the_event_type_argument_reaches_the_ledger_and_the_spans(
    emitguard_guard: Callable[..., Guard],
    emitguard_emissions: EmissionLedger,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    hub = Rooms()
    emitguard_guard(hub, tracer_provider=tracer_provider, **ROLES)
    hub.join("sid-1", "r1")

    await hub.emit("agent_started", {"n": 1}, "r1")
    await hub.emit("agent_completed", {"n": 2}, room="r1")

    emitguard_emissions.assert_delivered("agent_started", "agent_completed", thread="r1")
    with pytest.raises(AssertionError, match="delivered: agent_started, agent_completed"):
        emitguard_emissions.assert_delivered("tool_executing", thread="r1")
    types = [
        span.attributes.get("emitguard.event_type")
        for span in exporter.get_finished_spans()
        if span.attributes and "emitguard.event_type" in span.attributes
    ]
    assert types == ["agent_started", "agent_completed"]
    assert [event for _, event, _ in hub.sent] == ["agent_started", "agent_completed"]
