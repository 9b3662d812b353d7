"""The incident report's race, reproduced on the reference manager, then fixed by one line.

An agent starts emitting as soon as the user's message arrives; the handler associates the
connection with the thread a moment later. Unguarded, the first events are lost with the
report's log line. Guarded, every event arrives, in order, once.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

import emitguard
from emitguard import Outcome
from emitguard.testing import ReferenceManager

AGENT_EVENTS = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
]


async def agent_run(manager: ReferenceManager, thread_id: str) -> None:
    for kind in AGENT_EVENTS:
        await manager.send_to_thread(thread_id, {"type": kind, "thread": thread_id})
        await asyncio.sleep(0)


async def handle_start_agent(manager: ReferenceManager, user: str, thread: str, lag: float) -> None:
    """What the report's message handler does: start the agent, associate the thread later."""
    agent = asyncio.create_task(agent_run(manager, thread))
    await asyncio.sleep(lag)
    manager.update_connection_thread(user, thread)
    await agent


async def run_many(manager: ReferenceManager, runs: int) -> None:
    rng = random.Random(2025)
    for i in range(runs):
        manager.connect(f"user-{i}")
    await asyncio.gather(
        *(
            handle_start_agent(manager, f"user-{i}", f"thread-{i}", rng.uniform(0, 0.02))
            for i in range(runs)
        )
    )


async def test_unguarded_manager_loses_the_first_events(caplog: pytest.LogCaptureFixture) -> None:
    manager = ReferenceManager()
    with caplog.at_level(logging.WARNING):
        await run_many(manager, 30)
    assert manager.lost > 0
    assert "Cannot deliver message for thread thread-" in caplog.text
    assert any(
        [m["type"] for m in manager.received(f"thread-{i}")] != AGENT_EVENTS for i in range(30)
    )


async def test_guarded_manager_delivers_every_event_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = ReferenceManager()
    guard = emitguard.guard(manager, disconnect="disconnect_user")
    try:
        with caplog.at_level(logging.WARNING):
            await run_many(manager, 30)
        for i in range(30):
            assert [m["type"] for m in manager.received(f"thread-{i}")] == AGENT_EVENTS
            assert {m["thread"] for m in manager.received(f"thread-{i}")} == {f"thread-{i}"}
        assert manager.lost == 0
        assert "Cannot deliver message" not in caplog.text
        stats = guard.stats()
        assert stats.outcomes[Outcome.DELIVERED] == 30 * len(AGENT_EVENTS)
        assert stats.pending_total == 0
    finally:
        emitguard.unguard(manager)


async def test_short_disconnect_is_bridged_by_the_outbox() -> None:
    manager = ReferenceManager()
    emitguard.guard(manager, disconnect="disconnect_user", stamp_seq="seq")
    try:
        manager.connect("u")
        manager.update_connection_thread("u", "t")
        await manager.send_to_thread("t", {"type": "agent_started"})
        manager.disconnect_user("u")  # the socket dropped a moment ago
        await manager.send_to_thread("t", {"type": "tool_executing"})
        assert manager.lost == 0  # the legacy send was never called for a dead thread
        socket = manager.connect("u")
        manager.update_connection_thread("u", "t")  # reconnect: flushed, in order
        await asyncio.sleep(0)
        assert socket.received == [{"type": "tool_executing", "seq": 2}]
        assert [m["seq"] for m in manager.received("t")] == [1, 2]
    finally:
        emitguard.unguard(manager)
