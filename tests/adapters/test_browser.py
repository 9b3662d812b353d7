"""End to end in headless Chromium: a native EventSource resumes with Last-Event-ID, and the
official Socket.IO client recovers against a guarded python-socketio server.

The first page opens an ``EventSource`` on the SSE route. Half way through the run the server ends
the stream (``guard.end_subscriptions``); the browser reconnects by itself, sending
``Last-Event-ID``, and the page must end with every event exactly once, in order. Chromium is
driven over its DevTools protocol with the ``websockets`` client. ``.ci/run`` installs Debian's
``chromium``; elsewhere, without it, the test skips and says why.

The second page loads ``socket.io.min.js`` (the npm package's bundle, from
``tests/js/node_modules``, served by the test app: no network), joins a room, and closes its
WebSocket once mid-run; the client reconnects by itself and must say ``socket.recovered`` with
every event once, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse
from starlette.routing import Route
from websockets.asyncio.client import connect

from conftest import eventually
from emitguard import ConnectionState, Guard
from emitguard_adapters.fallback import emitguard_routes
from emitguard_adapters.socketio import guard_server
from emitguard_adapters.testing import serve

EVENTS = 12
DROP_AFTER = 5

PAGE = """<!doctype html>
<title>waiting</title>
<script>
  window.seen = [];
  const source = new EventSource("/emitguard/threads/run-1/events");
  source.addEventListener("agent_update", (e) => window.seen.push(Number(e.lastEventId)));
  source.addEventListener("agent_completed", (e) => {
    window.seen.push(Number(e.lastEventId));
    source.close();
    document.title = "done";
  });
</script>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium: .ci/run installs Debian's chromium package")
        pytest.skip("headless Chromium is not installed here (apt-get install chromium)")
    return found


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[str]:
    """A headless Chromium; yields the address of its DevTools endpoint."""
    profile = tmp_path / "profile"
    process = await asyncio.create_subprocess_exec(
        *[
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        for _ in range(200):
            if active.exists() and active.read_text().count("\n") >= 1:
                break
            await asyncio.sleep(0.05)
        port = active.read_text().splitlines()[0]
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def evaluate(page: Any, expression: str, ids: list[int]) -> Any:
    ids[0] += 1
    await page.send(
        json.dumps(
            {
                "id": ids[0],
                "method": "Runtime.evaluate",
                "params": {"expression": expression, "returnByValue": True},
            }
        )
    )
    while True:
        reply = json.loads(await asyncio.wait_for(page.recv(), 10))
        if reply.get("id") == ids[0]:
            return reply["result"]["result"].get("value")


async def test_event_source_resumes_with_last_event_id_and_misses_nothing(
    browser: str,
) -> None:
    guard = Guard(stamp_seq="seq", history=100, on_unready="buffer")
    resumed_from: list[str | None] = []

    def authorize(request: Request, thread_id: str) -> bool:
        resumed_from.append(request.headers.get("last-event-id"))
        return True

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    routes = [Route("/", page), *emitguard_routes(guard, authorize=authorize, retry_ms=100)]

    def connected() -> bool:
        return guard.state("run-1") is ConnectionState.CONNECTED

    async with serve(Starlette(routes=routes)) as address:
        async with httpx.AsyncClient() as client:
            target = (await client.put(f"http://{browser}/json/new?http://{address}/")).json()
        async with connect(target["webSocketDebuggerUrl"], max_size=None) as devtools:
            await eventually(connected)
            for n in range(1, EVENTS):
                assert await guard.send("run-1", {"type": "agent_update", "n": n}, _nowhere)
                if n == DROP_AFTER:  # the server drops the stream; the browser comes back
                    assert guard.end_subscriptions("run-1", "dropped by the test") == 1
                await asyncio.sleep(0.02)
            await eventually(connected)
            assert await guard.send("run-1", {"type": "agent_completed"}, _nowhere)
            ids = [0]
            for _ in range(500):
                if await evaluate(devtools, "document.title", ids) == "done":
                    break
                await asyncio.sleep(0.02)
            seen = await evaluate(devtools, "JSON.stringify(window.seen)", ids)
    assert json.loads(seen) == list(range(1, EVENTS + 1))
    assert resumed_from[0] is None
    # The browser's own reconnect said where it was: the last event it had read when the
    # stream ended (an event already queued for the stream but not written yet is replayed).
    cursors = [int(cursor) for cursor in resumed_from[1:] if cursor is not None]
    assert cursors
    assert 1 <= cursors[0] <= DROP_AFTER
    assert guard.stats().pending == {}


async def _nowhere(message: Any) -> bool:
    return False  # the page reads over SSE only: the manager has no socket for it


BUNDLE = Path(__file__).resolve().parents[1] / "js" / "node_modules" / "socket.io-client" / "dist"

SOCKETIO_PAGE = """<!doctype html>
<title>waiting</title>
<script src="/socket.io.min.js"></script>
<script>
  window.seen = [];
  window.connects = [];
  const socket = io({ transports: ["websocket"], reconnectionDelay: 100,
                      reconnectionDelayMax: 100, randomizationFactor: 0 });
  socket.on("connect", () => {
    window.connects.push({ id: socket.id, recovered: socket.recovered });
    if (!socket.recovered) socket.emit("join", "room-1", () => { document.title = "joined"; });
  });
  socket.on("tick", (n) => {
    window.seen.push(n);
    if (window.seen.length === %(drop)d) socket.io.engine.transport.ws.close();  // gone
  });
  socket.on("done", () => { document.title = "done"; });
</script>
"""


async def test_the_socketio_client_recovers_in_the_browser(browser: str) -> None:
    if not (BUNDLE / "socket.io.min.js").is_file():
        if os.environ.get("CI"):
            pytest.fail("CI must have the npm packages: make js (tests/js/package-lock.json)")
        pytest.skip("the socket.io-client bundle is not installed here (make js)")
    events, drop = 100, 30
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, history=500, max_disconnection_duration=10)

    @sio.event
    async def join(sid: str, room: str) -> bool:
        await sio.enter_room(sid, room)
        return True

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(SOCKETIO_PAGE % {"drop": drop})

    async def bundle(request: Request) -> FileResponse:
        return FileResponse(BUNDLE / "socket.io.min.js", media_type="text/javascript")

    site = Starlette(routes=[Route("/", page), Route("/socket.io.min.js", bundle)])
    app = socketio.ASGIApp(sio, other_asgi_app=site)
    async with serve(app) as address:
        async with httpx.AsyncClient() as client:
            target = (await client.put(f"http://{browser}/json/new?http://{address}/")).json()
        async with connect(target["webSocketDebuggerUrl"], max_size=None) as devtools:
            ids = [0]

            async def title_is(expected: str) -> None:
                for _ in range(500):
                    if await evaluate(devtools, "document.title", ids) == expected:
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError(f"the page never said {expected!r}")

            await title_is("joined")
            for n in range(1, events + 1):
                await sio.emit("tick", n, to="room-1")
                await asyncio.sleep(0.005)
            for _ in range(500):
                connects = await evaluate(devtools, "window.connects.length", ids)
                if connects == 2:
                    break
                await asyncio.sleep(0.02)
            await sio.emit("done", to="room-1")
            await title_is("done")
            seen = json.loads(await evaluate(devtools, "JSON.stringify(window.seen)", ids))
            connects = json.loads(await evaluate(devtools, "JSON.stringify(window.connects)", ids))
    adapter.unguard()
    await adapter.guard.aclose()
    assert connects == [
        {"id": connects[0]["id"], "recovered": False},
        {"id": connects[0]["id"], "recovered": True},
    ]
    assert seen == list(range(1, events + 1))
