"""A FastAPI app with the incident report's race, fixed by emitguard (see docs/starlette.md).

The connection manager below is the legacy kind: connections per user, a synchronous
``update_connection_thread`` and an ``async send_to_thread`` that logs ``Cannot deliver
message`` when the thread has no connection yet. The ``/ws`` endpoint starts the agent run
*before* it associates the thread, so unguarded, the first events of every run are lost.

Run it with ``uvicorn docs.fastapi_app:app`` (from the repository root) or
``python docs/fastapi_app.py``, then send ``{"user_id": "u1", "thread_id": "t1"}`` on
``ws://127.0.0.1:8000/ws``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

import emitguard
from emitguard_adapters.starlette import EmitGuardMiddleware

log = logging.getLogger("fastapi_app")


class WebSocketManager:
    """The legacy manager, unchanged: emitguard guards it from the outside."""

    def __init__(self) -> None:
        self._sockets: dict[str, tuple[str, WebSocket]] = {}
        self._thread_of: dict[str, str] = {}
        self._ids = itertools.count(1)
        self.lost = 0

    def connect(self, websocket: WebSocket, user_id: str) -> str:
        connection_id = f"conn-{next(self._ids)}"
        self._sockets[connection_id] = (user_id, websocket)
        return connection_id

    def disconnect(self, connection_id: str) -> None:
        self._sockets.pop(connection_id, None)
        self._thread_of.pop(connection_id, None)

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        found = [cid for cid, (user, _) in self._sockets.items() if user == user_id]
        for connection_id in found:
            self._thread_of[connection_id] = thread_id
        return bool(found)

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        targets = [cid for cid, thread in self._thread_of.items() if thread == thread_id]
        if not targets:
            log.warning("Cannot deliver message for thread %s - no connections", thread_id)
            self.lost += 1
            return False
        for connection_id in targets:
            await self._sockets[connection_id][1].send_json(message)
        return True


manager = WebSocketManager()
guard = emitguard.guard(manager)  # the fix, part 1: guard the manager you already have

app = FastAPI()
app.add_middleware(
    EmitGuardMiddleware, guard=guard
)  # part 2: connection lifecycle, confirmed sends

ASSOCIATION_LAG = 0.02
"""Seconds between starting the run and associating the thread (a DB lookup, say)."""


async def agent_run(thread_id: str, steps: int) -> None:
    await manager.send_to_thread(thread_id, {"type": "agent_started"})
    for step in range(steps):
        await manager.send_to_thread(thread_id, {"type": "agent_update", "step": step})
        await asyncio.sleep(0.005)
    await manager.send_to_thread(thread_id, {"type": "agent_completed"})


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    start = await websocket.receive_json()
    user_id, thread_id = str(start["user_id"]), str(start["thread_id"])
    connection_id = manager.connect(websocket, user_id)
    runs = {asyncio.create_task(agent_run(thread_id, int(start.get("steps", 3))))}
    try:
        await asyncio.sleep(ASSOCIATION_LAG)  # the agent does not wait for this: the race
        manager.update_connection_thread(user_id, thread_id)
        while True:  # each later message starts another run on the same thread
            start = await websocket.receive_json()
            runs.add(asyncio.create_task(agent_run(thread_id, int(start.get("steps", 3)))))
            runs = {run for run in runs if not run.done()}
    except WebSocketDisconnect:
        pass
    finally:
        manager.disconnect(connection_id)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
