"""Shape 1 of issue 12, rebuilt from its description over real sockets: a manager keyed by an
``int`` run id, whose ``connect(websocket, run_id)`` itself sends a "connected" message, and
whose send catches the disconnect and returns ``None`` (success or not).

30 conversations x 15 events; the agent of each run starts emitting before its client is
associated; every third client aborts its transport mid-run and reconnects. Unguarded, events
are lost; guarded (the guard, the Starlette middleware for transport confirmation, and a
replay on reconnect), every client gets every event once, in order, and no connect waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import emitguard
from emitguard import Guard
from emitguard_adapters.starlette import EmitGuardMiddleware, replay_to
from emitguard_adapters.testing import serve

RUNS, EVENTS, DROP_AT = 30, 15, 5

log = logging.getLogger("tests.run_manager")


class RunManager:
    """The shape as found in public code (our own code): sockets by run id, a greeting sent
    by ``connect``, a send that swallows a closed socket and returns ``None``."""

    def __init__(self) -> None:
        self.connections: dict[int, WebSocket] = {}
        self.closed: set[int] = set()

    async def connect(self, websocket: WebSocket, run_id: int) -> None:
        self.connections[run_id] = websocket
        self.closed.discard(run_id)
        await self.send_message(run_id, {"type": "system", "status": "connected"})

    async def send_message(self, run_id: int, message: dict[str, Any]) -> None:
        websocket = self.connections.get(run_id)
        if websocket is None or run_id in self.closed:
            log.warning("no open connection for run %s", run_id)
            return
        try:
            await websocket.send_json(message)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            log.warning("send to run %s failed: %r", run_id, exc)
            self.closed.add(run_id)

    async def disconnect(self, websocket: WebSocket) -> None:
        for run_id, known in list(self.connections.items()):
            if known is websocket:
                del self.connections[run_id]


def run_app(manager: RunManager, guard: Guard | None) -> Any:
    """``/ws``: the client's first message names its run (and, when it reconnects, the last
    ``seq`` it saw); guarded, the reconnect is replayed what it missed."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        hello = json.loads(await websocket.receive_text())
        run_id, last_seq = int(hello["run_id"]), int(hello.get("last_seq", 0))
        started = time.perf_counter()
        if guard is None:
            await manager.connect(websocket, run_id)
        else:
            async with guard.hold(run_id):  # nothing of the run goes out meanwhile
                await manager.connect(websocket, run_id)
                if last_seq:
                    await replay_to(websocket, guard, run_id, last_seq)
        websocket.app.state.connects.append(time.perf_counter() - started)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            await manager.disconnect(websocket)

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    app.state.connects = []
    return EmitGuardMiddleware(app, guard=guard) if guard is not None else app


async def agent(manager: RunManager, run_id: int) -> None:
    for n in range(1, EVENTS + 1):
        await manager.send_message(run_id, {"type": "agent_event", "run_id": run_id, "n": n})
        await asyncio.sleep(0.01)


@dataclass
class Client:
    run_id: int
    drops: bool
    received: list[int] = field(default_factory=list)
    greeted_after: list[float] = field(default_factory=list)
    last_seq: int = 0

    async def run(self, address: str, deadline: float) -> None:
        dropped = False
        while time.monotonic() < deadline:
            async with connect(f"ws://{address}/ws") as ws:
                started = time.perf_counter()
                await ws.send(json.dumps({"run_id": self.run_id, "last_seq": self.last_seq}))
                try:
                    while True:
                        left = deadline - time.monotonic()
                        message = json.loads(await asyncio.wait_for(ws.recv(), max(left, 0.01)))
                        if message["type"] == "system":
                            self.greeted_after.append(time.perf_counter() - started)
                            continue
                        seq = message.get("seq")
                        if seq is not None:
                            if seq <= self.last_seq:
                                continue  # seen before: a replay overlapping what arrived
                            self.last_seq = seq
                        self.received.append(message["n"])
                        if message["n"] == EVENTS:
                            return
                        if self.drops and not dropped and len(self.received) == DROP_AT:
                            dropped = True
                            ws.transport.abort()  # killed mid-run
                            break
                except (asyncio.TimeoutError, TimeoutError, ConnectionClosed):
                    return
            await asyncio.sleep(0.03)  # away for a moment, then back


async def scenario(guarded: bool) -> tuple[list[Client], list[float], Guard | None]:
    manager = RunManager()
    guard = (
        emitguard.guard(
            manager,
            send="send_message",
            associate="connect",
            disconnect="disconnect",
            thread_param="run_id",
            stamp_seq="seq",
            history=100,
        )
        if guarded
        else None
    )
    app = run_app(manager, guard)
    rng = random.Random(12)
    clients = [Client(run_id, drops=run_id % 3 == 0) for run_id in range(1, RUNS + 1)]
    try:
        async with serve(app) as address:
            deadline = time.monotonic() + 5.0

            async def conversation(client: Client) -> None:
                work = asyncio.create_task(agent(manager, client.run_id))  # emits at once
                await asyncio.sleep(rng.uniform(0.0, 0.03))  # the client is not there yet
                await client.run(address, deadline)
                await work

            await asyncio.gather(*(conversation(client) for client in clients))
            if guard is not None:
                assert await guard.drain(2.0) == 0
        connects = list((app.app if guard is not None else app).state.connects)
        return clients, connects, guard
    finally:
        if guard is not None:
            emitguard.unguard(manager)


async def test_unguarded_run_manager_loses_events() -> None:
    clients, _, _ = await scenario(guarded=False)
    lost = sum(EVENTS - len(set(c.received)) for c in clients)
    print(f"\nrun manager, unguarded: lost {lost} of {RUNS * EVENTS}")
    assert lost > 0


async def test_guarded_run_manager_loses_nothing_and_no_connect_waits() -> None:
    clients, connects, guard = await scenario(guarded=True)
    assert guard is not None
    lost = sum(EVENTS - len(set(c.received)) for c in clients)
    duplicates = sum(len(c.received) - len(set(c.received)) for c in clients)
    reordered = sum(c.received != sorted(c.received) for c in clients)
    greetings = [t for c in clients for t in c.greeted_after]
    print(
        f"\nrun manager, guarded: lost {lost}, duplicates {duplicates}, reordered {reordered}; "
        f"server connect max {max(connects) * 1000:.1f} ms, "
        f"client greeting max {max(greetings) * 1000:.1f} ms"
    )
    assert (lost, duplicates, reordered) == (0, 0, 0)
    assert all(c.received == list(range(1, EVENTS + 1)) for c in clients)
    assert len(connects) == RUNS + RUNS // 3  # every dropped client came back
    assert max(connects) < 0.050  # the greeting inside connect() never waits on the barrier
    stats = guard.stats()
    assert stats.pending_total == 0
    assert stats.waiting == {}
