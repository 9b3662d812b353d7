"""The official ``socket.io-client`` (npm, under Node) recovers against a guarded
python-socketio server under uvicorn, with no client code of ours.

``tests/js/recovering_client.cjs`` is a plain Socket.IO app: it joins a room, records the
events, kills its own transport once mid-run and lets the client reconnect by itself. The
packages come from ``tests/js/package-lock.json`` (``make js``: ``npm ci``); without Node or
them the tests skip and say why, except in CI, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from socketio_support import client, running, until

from emitguard import ConnectionState
from emitguard_adapters.socketio import guard_server

JS = Path(__file__).resolve().parents[1] / "js"
CLIENTS = ["socket.io-client", "socket.io-client-4.6"]
"""The current client (4.8) and the first with connection state recovery (4.6)."""


def node() -> str:
    found = shutil.which("node")
    missing = None if found else "Node is not installed"
    if found and not (JS / "node_modules" / "socket.io-client").is_dir():
        missing = "the npm packages are not installed (make js)"
    if missing is not None or found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the JavaScript client: {missing}")
        pytest.skip(f"{missing}: the official Socket.IO client cannot run here")
    return found


class NodeClient:
    """The Node process and the JSON lines it printed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def connects(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "connect" in line]

    def joined(self) -> int:
        return sum("joined" in line for line in self.lines)

    async def result(self) -> dict[str, Any]:
        await asyncio.wait_for(self.process.wait(), 20)
        await self._reader
        assert self.process.returncode == 0, self.lines
        return self.lines[-1]


@pytest.fixture
async def js_client() -> AsyncIterator[Any]:
    started: list[NodeClient] = []

    async def start(url: str, room: str, drop_at: int, package: str, delay_ms: int) -> NodeClient:
        process = await asyncio.create_subprocess_exec(
            node(),
            str(JS / "recovering_client.cjs"),
            url,
            room,
            str(drop_at),
            package,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "RECONNECTION_DELAY": str(delay_ms)},
        )
        started.append(NodeClient(process))
        return started[-1]

    yield start
    for each in started:
        if each.process.returncode is None:
            each.process.kill()
            await each.process.wait()


def server(**options: Any) -> tuple[socketio.AsyncServer, Any]:
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, **options)

    @sio.event
    async def join(sid: str, room: str) -> bool:
        await sio.enter_room(sid, room)
        return True

    return sio, adapter


EVENTS, DROP_AT = 100, 30


@pytest.mark.parametrize("package", CLIENTS)
@pytest.mark.parametrize("observer", [False, True], ids=["alone", "with-observer"])
async def test_the_official_client_recovers_every_event_once_in_order(
    js_client: Any, package: str, observer: bool
) -> None:
    """Its transport is killed after 30 of 100 events; it reconnects by itself. Alone in the
    room, what was emitted meanwhile waits in the outbox; with another member (a Python
    client), it was delivered and comes from the replay window. Either way: recovered, the
    same sid, every event once, in order."""
    sio, adapter = server(history=500, max_disconnection_duration=10)
    async with running(sio) as url:
        watcher = client()
        if observer:
            await watcher.connect(url, transports=["websocket"])
            await watcher.call("join", "room-1")
        js = await js_client(url, "room-1", DROP_AT, package, 100)
        await until(lambda: js.joined() == 1, timeout=10)
        for n in range(1, EVENTS + 1):
            await sio.emit("tick", n, to="room-1")
            await asyncio.sleep(0.005)
        await until(lambda: len(js.connects()) == 2, timeout=10)
        await sio.emit("done", to="room-1")
        result = await js.result()
        if observer:
            await watcher.disconnect()
    adapter.unguard()
    await adapter.guard.aclose()
    first, second = result["connects"]
    assert first == {"id": first["id"], "recovered": False}
    assert second == {"id": first["id"], "recovered": True}  # same sid, recovered
    assert result["recovered"] is True
    assert result["received"] == list(range(1, EVENTS + 1))  # every event once, in order
    assert js.joined() == 1  # the app did not join again: its rooms came back


@pytest.mark.parametrize("package", CLIENTS)
async def test_away_longer_than_allowed_the_official_client_starts_afresh(
    js_client: Any, package: str
) -> None:
    """Away longer than ``max_disconnection_duration``: ``recovered === false``, a new sid,
    and none of the events emitted meanwhile (delivered to another member) is replayed."""
    sio, adapter = server(history=500, max_disconnection_duration=0.3)
    async with running(sio) as url:
        watcher = client()
        await watcher.connect(url, transports=["websocket"])
        await watcher.call("join", "room-1")
        js = await js_client(url, "room-1", 5, package, 1500)  # back after 1.5 s
        await until(lambda: js.joined() == 1, timeout=10)
        for n in range(1, 6):
            await sio.emit("tick", n, to="room-1")
        await until(
            lambda: adapter.guard.stats().pending_total == 0
            and len(sio.manager.rooms["/"]["room-1"]) == 1  # the Node client is gone
        )
        for n in range(6, 21):  # away: delivered to the watcher only
            await sio.emit("tick", n, to="room-1")
        await until(lambda: js.joined() == 2, timeout=10)  # a fresh session joins again
        await sio.emit("done", to="room-1")
        result = await js.result()
        await watcher.disconnect()
    adapter.unguard()
    await adapter.guard.aclose()
    first, second = result["connects"]
    assert second["recovered"] is False
    assert second["id"] != first["id"]
    assert result["received"] == [1, 2, 3, 4, 5]  # no partial replay
    assert adapter.guard.state(("/", "room-1")) is ConnectionState.DISCONNECTED
