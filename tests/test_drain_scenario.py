"""``drain(timeout)`` waits for reconnects (DESIGN.md section 7, issue 10).

The report's race at scale: 200 agent runs start emitting while their handler associates the
thread a moment later; in 10% of the runs the user's connection goes away mid-run (the owner
disconnects) and comes back 20 ms later (a new socket, associated again). When the agents are
done, ``await guard.drain(2.0)`` must wait for those reconnects, like a producer's
``flush(timeout)``: it returns 0, and every thread's client received its five events, in
order, once. Twenty repetitions, each with its own manager and guard.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import emitguard
from support import ThreadManager

EVENTS = ("agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed")
RUNS = 200
REPETITIONS = 20
RECONNECT_AFTER = 0.02


@dataclass
class Run:
    """One agent run and what happens to its user's connection."""

    user: str
    thread: str
    lag: float
    """Seconds between the agent's start and the association."""
    drops: bool
    """The owner disconnects mid-run and reconnects ``RECONNECT_AFTER`` later."""
    reconnected: asyncio.Event = field(default_factory=asyncio.Event)


async def agent(manager: ThreadManager, run: Run) -> None:
    for kind in EVENTS:
        await manager.send_to_thread(run.thread, {"type": kind, "thread": run.thread})
        await asyncio.sleep(0.002)


async def handler(manager: ThreadManager, run: Run) -> None:
    """The WebSocket handler: associates late; for a dropping run, the user goes away after
    two events and a new connection is associated 20 ms later."""
    await asyncio.sleep(run.lag)
    manager.update_connection_thread(run.user, run.thread)
    if not run.drops:
        return
    await asyncio.sleep(0.003)  # mid-run: the agent has sent one or two events
    manager.disconnect_user(run.user)
    await asyncio.sleep(RECONNECT_AFTER)
    manager.connect(run.user)
    manager.update_connection_thread(run.user, run.thread)
    run.reconnected.set()


async def one_scenario(rng: random.Random) -> tuple[int, list[str]]:
    """Run the 200 agent runs once; returns what ``drain(2.0)`` left and what went wrong."""
    manager = ThreadManager()
    guard = emitguard.guard(manager, disconnect="disconnect_user")
    runs = [
        Run(f"user-{i}", f"thread-{i}", rng.uniform(0, 0.01), drops=i % 10 == 0)
        for i in range(RUNS)
    ]
    try:
        for run in runs:
            manager.connect(run.user)
        handlers = [asyncio.create_task(handler(manager, run)) for run in runs]
        await asyncio.gather(*(agent(manager, run) for run in runs))
        reconnects_pending = sum(1 for run in runs if run.drops and not run.reconnected.is_set())
        left = await guard.drain(2.0)
        await asyncio.gather(*handlers)
        problems = (
            [
                f"{reconnects_pending} reconnects were pending when drain() started"
                f" and drain(2.0) returned {left}"
            ]
            if left
            else []
        )
        for run in runs:
            got: list[Any] = [message["type"] for message in manager.received(run.thread)]
            if tuple(got) != EVENTS:
                problems.append(f"{run.thread} (drops={run.drops}) received {got}")
        return left, problems
    finally:
        emitguard.unguard(manager)
        await guard.aclose()


async def test_drain_waits_for_reconnects_in_every_repetition() -> None:
    rng = random.Random(10)
    failed: list[str] = []
    for repetition in range(1, REPETITIONS + 1):
        left, problems = await one_scenario(rng)
        if problems:
            failed.append(
                f"repetition {repetition}: drain(2.0) returned {left}; "
                f"{len(problems)} problem(s), first: {problems[0]}"
                + (f"; then {problems[1]}" if len(problems) > 1 else "")
            )
    assert not failed, (
        f"{len(failed)} of {REPETITIONS} repetitions lost or left events:\n" + "\n".join(failed)
    )
