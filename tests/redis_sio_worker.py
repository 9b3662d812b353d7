"""One uvicorn worker process of the multi-worker python-socketio tests: a guarded
``AsyncServer`` on a shared Redis outbox, with recovery.

    socket.io event "join" <room>     the client enters the room (answers True)
    POST /emit {"room", "count", "start", "interval", "event"}
                                      an agent in this worker: emits <event> (default "tick")
                                      {"n": start + i} to the room, i = 0 .. count-1
    GET /emitted                      {room: emits done} so far

Run: ``python tests/redis_sio_worker.py <redis url> <port> <max_disconnection_duration>``;
it prints ``ready`` once it listens.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import socketio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from emitguard_adapters.socketio import guard_server


def build(url: str, away: float) -> Any:
    sio = socketio.AsyncServer(async_mode="asgi")
    guard_server(sio, outbox=url, recovery=True, max_disconnection_duration=away)
    emitted: dict[str, int] = {}
    agents: set[asyncio.Task[Any]] = set()

    @sio.event
    async def join(sid: str, room: str) -> bool:
        await sio.enter_room(sid, room)
        return True

    async def agent(room: str, count: int, start: int, interval: float, event: str) -> None:
        for n in range(start, start + count):
            await sio.emit(event, {"n": n}, to=room)
            emitted[room] = emitted.get(room, 0) + 1
            await asyncio.sleep(interval)

    async def emit(request: Request) -> JSONResponse:
        order = await request.json()
        task = asyncio.create_task(
            agent(
                order["room"],
                order["count"],
                order.get("start", 0),
                order.get("interval", 0.0),
                order.get("event", "tick"),
            )
        )
        agents.add(task)
        task.add_done_callback(agents.discard)
        return JSONResponse({"started": True})

    async def counts(request: Request) -> JSONResponse:
        return JSONResponse(emitted)

    http = Starlette(routes=[Route("/emit", emit, methods=["POST"]), Route("/emitted", counts)])
    return socketio.ASGIApp(sio, other_asgi_app=http)


class _Ready(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        print("ready", flush=True)


if __name__ == "__main__":
    app = build(sys.argv[1], float(sys.argv[2 + 1]))
    config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    _Ready(config).run()
