"""A mission-critical test of agent events, the way the incident's suite should have been.

No ``MagicMock(spec=WebSocketManager)``: a real (reference) legacy manager, a tiny agent
executor that emits the five agent events through a bridge, and the report's race on purpose:
the association happens 20 ms after the agent starts. The ``emitguard_emissions`` fixture fails
the test if any event is lost, dropped or still undelivered at the end.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from emitguard.testing import ReferenceManager

AGENT_EVENTS = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
]


class AgentWebSocketBridge:
    """What the backend's agents call to report progress."""

    def __init__(self, manager: ReferenceManager) -> None:
        self.manager = manager

    async def emit(self, thread_id: str, event_type: str, **data: Any) -> bool:
        return await self.manager.send_to_thread(thread_id, {"type": event_type, **data})


async def run_agent(bridge: AgentWebSocketBridge, thread_id: str) -> None:
    """A tiny agent executor: think, call a tool, answer."""
    await bridge.emit(thread_id, "agent_started")
    await bridge.emit(thread_id, "agent_thinking", text="looking it up")
    await bridge.emit(thread_id, "tool_executing", tool="search")
    await asyncio.sleep(0.001)
    await bridge.emit(thread_id, "tool_completed", tool="search")
    await bridge.emit(thread_id, "agent_completed", text="done")


async def handle_start_agent(manager: ReferenceManager, user_id: str, thread_id: str) -> None:
    """The message handler of the report: it starts the agent, then associates the thread."""
    agent = asyncio.create_task(run_agent(AgentWebSocketBridge(manager), thread_id))
    manager.update_connection_thread(user_id, thread_id)
    await agent


@pytest.fixture
def manager(emitguard_manager: ReferenceManager, emitguard_guard: Any) -> ReferenceManager:
    emitguard_guard(emitguard_manager, disconnect="disconnect_user")  # the one-line fix
    return emitguard_manager


async def test_every_agent_event_reaches_the_user(
    manager: ReferenceManager, emitguard_faults: Any, emitguard_emissions: Any
) -> None:
    socket = manager.connect("user-1")
    emitguard_faults.delay_association(manager, 0.02)  # the race, on purpose

    await handle_start_agent(manager, "user-1", "thread-1")
    await asyncio.sleep(0.03)  # let the delayed association happen

    emitguard_emissions.assert_delivered(*AGENT_EVENTS, thread="thread-1")
    assert [m["type"] for m in socket.received] == AGENT_EVENTS
