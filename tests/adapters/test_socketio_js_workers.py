"""The official ``socket.io-client`` (Node) recovers on another worker: three guarded
python-socketio workers on one redis-server (``tests/redis_sio_worker.py``), behind a TCP
front that sends new connections to one worker, as a load balancer does. The client's
worker is killed with ``kill -9`` mid-stream and the front sends its reconnection to another:
``socket.recovered`` on the other worker, the same id, every event once, in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from test_socketio_js import js_client  # noqa: F401 (the fixture)

from redis_support import AppWorker, RedisServer

SIO = Path(__file__).parent.parent / "redis_sio_worker.py"


class Front:
    """A TCP front on loopback: each new connection goes to the worker ``target`` names."""

    def __init__(self) -> None:
        self.target = 0
        self.connections = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def front() -> AsyncIterator[tuple[Front, str]]:
    routing = Front()
    server = await asyncio.start_server(routing._accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield routing, f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def emit(worker: AppWorker, room: str, count: int, **order: Any) -> None:
    async with httpx.AsyncClient(base_url=worker.http) as http:
        response = await http.post("/emit", json={"room": room, "count": count, **order})
        assert response.status_code == 200


async def reached(worker: AppWorker, count: int, room: str = "room-1") -> None:
    """Wait until the worker's agent has emitted ``count`` events to the room."""
    async with httpx.AsyncClient(base_url=worker.http) as http:
        for _ in range(2000):
            if int((await http.get("/emitted")).json().get(room, 0)) >= count:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"the agent did not emit {count} events")


async def test_the_official_client_recovers_on_another_worker(
    redis_server: RedisServer,
    js_client: Any,  # noqa: F811
) -> None:
    workers = [AppWorker(SIO, redis_server.url, "30") for _ in range(3)]
    agent, first, second = workers
    try:
        async with front() as (routing, url):
            routing.target = first.port
            js = await js_client(url, "room-1", 10_000, "socket.io-client", 100)  # no self-drop
            for _ in range(1000):
                if js.joined() == 1:
                    break
                await asyncio.sleep(0.01)
            assert js.joined() == 1
            await emit(agent, "room-1", 100, interval=0.005)
            await reached(agent, 30)
            routing.target = second.port  # the front's next connections go to the second
            first.kill()  # kill -9 the client's worker mid-stream
            await reached(agent, 100)
            for _ in range(1000):
                if len(js.connects()) == 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the replay and the live tail reach it
            await emit(agent, "room-1", 1, event="done")
            result = await js.result()
    finally:
        for worker in workers:
            worker.stop()
    one, two = result["connects"]
    assert one == {"id": one["id"], "recovered": False}
    assert two == {"id": one["id"], "recovered": True}  # same sid, on the second worker
    assert result["received"] == [{"n": n} for n in range(100)]  # every event once, in order
    assert js.joined() == 1  # its room came back with the session
    assert routing.connections == 2  # the first through the killed worker, then the second
