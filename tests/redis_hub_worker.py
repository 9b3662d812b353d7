"""One uvicorn worker process of the multi-process hub tests: a Starlette app whose
:class:`~emitguard_adapters.starlette.ThreadHub` and SSE/polling routes share one Redis.

    /ws                         the hub's websocket endpoint (hello, replay, live)
    POST /emit {"thread", "count", "interval"}
                                an agent in this worker: sends n = 0 .. count-1 to the thread
    POST /emit-items {"items": [[thread, n], ...]}
                                sends them (per thread in order, threads at once); answers
                                {"acked": how many returned True} once all are sent
    GET /emitted                {thread: how many of its sends returned True} so far
    /emitguard/threads/...      SSE and polling (emitguard_routes)

Run: ``python tests/redis_hub_worker.py <redis url> <port>``; it prints ``ready`` once it
listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from emitguard_adapters.fallback import emitguard_routes
from emitguard_adapters.starlette import ThreadHub, allow_any


def build(url: str) -> Starlette:
    hub = ThreadHub(authorize=allow_any, outbox=url, name="hub-worker")
    emitted: dict[str, int] = {}
    agents: set[asyncio.Task[Any]] = set()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await hub.serve(websocket)

    async def agent(thread_id: str, count: int, interval: float) -> None:
        for n in range(count):
            if await hub.send(thread_id, {"type": "agent_update", "n": n}):
                emitted[thread_id] = emitted.get(thread_id, 0) + 1
            await asyncio.sleep(interval)

    async def emit(request: Request) -> JSONResponse:
        order = await request.json()
        task = asyncio.create_task(
            agent(order["thread"], order["count"], order.get("interval", 0.0))
        )
        agents.add(task)
        task.add_done_callback(agents.discard)
        return JSONResponse({"started": True})

    async def emit_items(request: Request) -> JSONResponse:
        per_thread: dict[str, list[int]] = {}
        for thread_id, n in (await request.json())["items"]:
            per_thread.setdefault(thread_id, []).append(n)

        async def in_order(thread_id: str, numbers: list[int]) -> int:
            acked = 0
            for n in numbers:
                acked += bool(await hub.send(thread_id, {"type": "agent_update", "n": n}))
            return acked

        acks = await asyncio.gather(*(in_order(t, ns) for t, ns in per_thread.items()))
        return JSONResponse({"acked": sum(acks)})

    async def counts(request: Request) -> JSONResponse:
        return JSONResponse(emitted)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await hub.guard.aclose()

    routes = [
        WebSocketRoute("/ws", endpoint),
        Route("/emit", emit, methods=["POST"]),
        Route("/emit-items", emit_items, methods=["POST"]),
        Route("/emitted", counts),
        *emitguard_routes(hub.guard, authorize=allow_any),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


class _Ready(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        print("ready", flush=True)


if __name__ == "__main__":
    config = uvicorn.Config(
        build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning"
    )
    _Ready(config).run()
