"""SSE and polling fallback over a real uvicorn server, read with httpx."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect

from conftest import eventually
from emitguard import ConnectionState, Guard, Outcome
from emitguard_adapters.fallback import emitguard_routes
from emitguard_adapters.starlette import ThreadHub, allow_any
from emitguard_adapters.testing import serve

BASE = "/emitguard/threads"


async def no_socket(message: Any) -> bool:
    return False  # the manager has no websocket for the thread: only SSE readers


def allow_but_secret(request: Request, thread_id: str) -> bool:
    return thread_id != "secret"


# Keyed by the response itself, weakly. Keyed by id(), an entry outlived its response: the
# loop's shutdown closes the line iterator (and with it its hold on the response), the
# response is freed, and a later test's response given the same id read that finished
# iterator (StopAsyncIteration at once: a stream that seemed to end by itself).
_lines: weakref.WeakKeyDictionary[httpx.Response, AsyncIterator[str]] = (
    weakref.WeakKeyDictionary()
)


async def read_events(response: httpx.Response, count: int) -> list[dict[str, Any]]:
    """The next ``count`` SSE events (comments and retry-only blocks skipped)."""
    events: list[dict[str, Any]] = []
    current: dict[str, str] = {}
    lines = _lines.get(response)
    if lines is None:
        lines = _lines[response] = response.aiter_lines()
    while len(events) < count:
        line = await asyncio.wait_for(anext(lines), 10)
        if line == "":
            if "data" in current:
                events.append({**current, "data": json.loads(current["data"])})
            current = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            current[field] = value[1:] if value.startswith(" ") else value
    return events


@pytest.fixture
def guard() -> Guard:
    return Guard(stamp_seq="seq", history=5, on_unready="buffer", name="fallback")


@pytest.fixture
async def server(guard: Guard) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=emitguard_routes(guard, authorize=allow_but_secret, ping=0.2))
    async with (
        serve(app) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=5) as client,
    ):
        yield client


async def send(guard: Guard, thread_id: str, kind: str, count: int = 1) -> None:
    for n in range(count):
        assert await guard.send(thread_id, {"type": kind, "n": n}, no_socket)


async def test_the_stream_delivers_each_event_with_its_seq_type_and_json(
    server: httpx.AsyncClient, guard: Guard
) -> None:
    async with server.stream("GET", f"{BASE}/t1/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        await eventually(lambda: guard.state("t1") is ConnectionState.CONNECTED)
        await send(guard, "t1", "agent_update", 2)
        assert await guard.send("t1", {"type": "agent_completed"}, no_socket)
        events = await read_events(response, 3)
    assert [(e["id"], e["event"]) for e in events] == [
        ("1", "agent_update"),
        ("2", "agent_update"),
        ("3", "agent_completed"),
    ]
    assert events[0]["data"] == {"type": "agent_update", "n": 0, "seq": 1}
    outcomes = guard.stats().outcomes
    assert (outcomes[Outcome.DELIVERED], outcomes[Outcome.BUFFERED]) == (3, 0)


@pytest.mark.parametrize("how", ["header", "query"])
async def test_a_stream_resumes_after_the_last_event_id(
    server: httpx.AsyncClient, guard: Guard, how: str
) -> None:
    async with server.stream("GET", f"{BASE}/t1/events") as first:
        await eventually(lambda: guard.state("t1") is ConnectionState.CONNECTED)
        await send(guard, "t1", "agent_update", 4)
        await read_events(first, 4)
    headers = {"Last-Event-ID": "2"} if how == "header" else {}
    params = {"last_event_id": "2"} if how == "query" else {}
    async with server.stream("GET", f"{BASE}/t1/events", headers=headers, params=params) as again:
        missed = await read_events(again, 2)
        await eventually(lambda: guard.state("t1") is ConnectionState.CONNECTED)
        await send(guard, "t1", "agent_completed")
        live = await read_events(again, 1)
    assert [e["id"] for e in missed + live] == ["3", "4", "5"]


async def test_a_gap_beyond_the_window_is_a_resync_event(
    server: httpx.AsyncClient, guard: Guard
) -> None:
    async with server.stream("GET", f"{BASE}/t1/events") as first:
        await eventually(lambda: guard.state("t1") is ConnectionState.CONNECTED)
        await send(guard, "t1", "agent_update", 8)  # the window keeps the last 5
        await read_events(first, 8)
    async with server.stream("GET", f"{BASE}/t1/events", headers={"Last-Event-ID": "1"}) as again:
        [resync] = await read_events(again, 1)
    assert resync["event"] == "resync"
    assert "id" not in resync
    assert resync["data"] == {
        "type": "resync",
        "thread_id": "t1",
        "last_seq": 1,
        "latest_seq": 8,
        "recovered": False,
    }


async def test_polling_pages_through_what_was_missed(
    server: httpx.AsyncClient, guard: Guard
) -> None:
    subscription = guard.subscribe("t1")  # a reader, so the events count as delivered
    await send(guard, "t1", "agent_update", 5)
    subscription.close()
    pages = []
    after = 0
    while True:
        response = await server.get(f"{BASE}/t1/messages", params={"after": after, "limit": 2})
        assert response.status_code == 200
        page = response.json()
        pages.append([m["seq"] for m in page["messages"]])
        after = page["next_after"]
        if not page["more"]:
            break
    assert pages == [[1, 2], [3, 4], [5]]
    assert page["latest_seq"] == 5
    assert page["messages"][0] == {
        "seq": 5,
        "event": "agent_update",
        "data": {"type": "agent_update", "n": 4, "seq": 5},
    }
    empty = (await server.get(f"{BASE}/t1/messages", params={"after": 5})).json()
    assert (empty["messages"], empty["next_after"], empty["more"]) == ([], 5, False)


async def test_polling_past_the_window_says_resync(server: httpx.AsyncClient, guard: Guard) -> None:
    subscription = guard.subscribe("t1")
    await send(guard, "t1", "agent_update", 8)
    subscription.close()
    page = (await server.get(f"{BASE}/t1/messages", params={"after": 1})).json()
    assert page["type"] == "resync"
    assert (page["recovered"], page["latest_seq"], page["next_after"]) == (False, 8, 8)
    assert page["messages"] == []


@pytest.mark.parametrize(
    ("path", "params", "headers", "status", "error"),
    [
        ("secret/events", {}, {}, 403, "not allowed to read this thread"),
        ("secret/messages", {}, {}, 403, "not allowed to read this thread"),
        ("-bad/events", {}, {}, 400, "not a valid thread id"),
        ("a%20b/messages", {}, {}, 400, "not a valid thread id"),
        ("t1/messages", {"after": "x"}, {}, 400, "after must be a whole number >= 0"),
        ("t1/messages", {"limit": "0"}, {}, 400, "limit must be from 1 to 1000"),
        ("t1/messages", {"limit": "5000"}, {}, 400, "limit must be from 1 to 1000"),
        ("t1/events", {}, {"Last-Event-ID": "abc"}, 400, "Last-Event-ID must be a whole"),
    ],
)
async def test_refusals_carry_no_data(
    server: httpx.AsyncClient,
    guard: Guard,
    path: str,
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    subscription = guard.subscribe("secret")
    await send(guard, "secret", "private")
    subscription.close()
    response = await server.get(f"{BASE}/{path}", params=params, headers=headers)
    assert response.status_code == status
    assert response.json()["error"].startswith(error)
    assert "private" not in response.text


async def test_an_authorize_that_raises_refuses(guard: Guard) -> None:
    async def broken(request: Request, thread_id: str) -> bool:
        raise RuntimeError("auth service down")

    app = Starlette(routes=emitguard_routes(guard, authorize=broken))
    async with serve(app) as address, httpx.AsyncClient() as client:
        response = await client.get(f"http://{address}{BASE}/t1/messages")
    assert response.status_code == 403


async def test_a_client_that_goes_away_leaves_the_thread(
    server: httpx.AsyncClient, guard: Guard
) -> None:
    async with server.stream("GET", f"{BASE}/t1/events"):
        await eventually(lambda: guard.state("t1") is ConnectionState.CONNECTED)
    await eventually(lambda: guard.state("t1") is ConnectionState.DISCONNECTED)
    await send(guard, "t1", "agent_update")
    assert guard.stats().pending == {"t1": 1}


async def test_many_subscribers_on_one_thread_each_get_everything(
    server: httpx.AsyncClient, guard: Guard
) -> None:
    streams = [server.stream("GET", f"{BASE}/t1/events") for _ in range(5)]
    responses = [await stream.__aenter__() for stream in streams]
    try:
        await eventually(lambda: guard.subscribers("t1") == 5)
        await send(guard, "t1", "agent_update", 3)
        for response in responses:
            assert [e["id"] for e in await read_events(response, 3)] == ["1", "2", "3"]
    finally:
        for stream in streams:
            await stream.__aexit__(None, None, None)


async def test_one_subscriber_per_thread_gets_only_its_thread(
    server: httpx.AsyncClient, guard: Guard
) -> None:
    threads = [f"t{i}" for i in range(10)]
    streams = {t: server.stream("GET", f"{BASE}/{t}/events") for t in threads}
    responses = {t: await stream.__aenter__() for t, stream in streams.items()}
    try:
        await eventually(lambda: all(guard.state(t) is ConnectionState.CONNECTED for t in threads))
        for thread_id in threads:
            await send(guard, thread_id, f"for_{thread_id}")
        for thread_id, response in responses.items():
            [event] = await read_events(response, 1)
            assert event["event"] == f"for_{thread_id}"
    finally:
        for stream in streams.values():
            await stream.__aexit__(None, None, None)


async def test_server_shutdown_ends_open_streams(guard: Guard) -> None:
    app = Starlette(routes=emitguard_routes(guard, authorize=allow_but_secret))
    ended = asyncio.Event()

    async def reader(address: str) -> None:
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("GET", f"http://{address}{BASE}/t1/events") as response,
        ):
            async for _ in response.aiter_lines():
                pass
        ended.set()

    async with serve(app) as address:
        task = asyncio.create_task(reader(address))
        await eventually(lambda: guard.state("t1") is ConnectionState.CONNECTED)
    await asyncio.wait_for(ended.wait(), 5)
    await task
    assert guard.state("t1") is ConnectionState.DISCONNECTED


async def test_sse_and_websocket_clients_share_one_seq_space() -> None:
    hub = ThreadHub(authorize=allow_any, history=10)

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await hub.attach(websocket, "t1")
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            await hub.detach(websocket)

    routes = [
        WebSocketRoute("/ws", endpoint),
        *emitguard_routes(hub.guard, authorize=allow_any),
    ]
    async with (
        serve(Starlette(routes=routes)) as address,
        connect(f"ws://{address}/ws") as ws,
        httpx.AsyncClient() as client,
    ):
        await eventually(lambda: hub.connections("t1") == 1)
        async with client.stream("GET", f"http://{address}{BASE}/t1/events") as response:
            # the websocket reads through a subscription of its own, the stream through another
            await eventually(lambda: hub.guard.subscribers("t1") == 2)
            assert await hub.send("t1", {"type": "agent_update"})
            [event] = await read_events(response, 1)
        frame = json.loads(await asyncio.wait_for(ws.recv(), 3))
    assert frame == event["data"] == {"type": "agent_update", "seq": 1}
    assert event["id"] == "1"


def test_the_routes_refuse_a_bad_setup() -> None:
    with pytest.raises(TypeError, match="there is no allow-all default"):
        emitguard_routes(Guard(history=1), authorize=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a guard with a replay window"):
        emitguard_routes(Guard(), authorize=allow_any)


async def test_an_idle_stream_gets_keep_alive_pings(server: httpx.AsyncClient) -> None:
    async with server.stream("GET", f"{BASE}/t1/events") as response:
        lines = response.aiter_lines()
        comments = []
        while len(comments) < 3:  # the opening comment, then pings every 0.2 s
            line = await asyncio.wait_for(anext(lines), 10)
            if line.startswith(":"):
                comments.append(line)
    assert comments[0] == ": emitguard"
    assert all(comment.startswith(": ping") for comment in comments[1:])


async def test_a_head_request_opens_no_subscription(
    server: httpx.AsyncClient, guard: Guard
) -> None:
    """Found in review: HEAD subscribed, which flushed the outbox into a stream nobody read."""
    await send(guard, "t1", "agent_update", 3)  # buffered: nobody reads t1 yet
    response = await server.head(f"{BASE}/t1/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert guard.stats().pending == {"t1": 3}
    assert guard.state("t1") is not ConnectionState.CONNECTED


@pytest.mark.parametrize("value", ["²", "٣", "1e3", " 1", "-1"])
async def test_cursors_that_are_not_ascii_digits_are_400(
    server: httpx.AsyncClient, value: str
) -> None:
    """Found in review: str.isdigit() let '²' through to int(), a 500."""
    for path, params in [
        (f"{BASE}/t1/messages", {"after": value}),
        (f"{BASE}/t1/messages", {"limit": value}),
        (f"{BASE}/t1/events", {"last_event_id": value}),
    ]:
        response = await server.get(path, params=params)
        assert response.status_code == 400, (path, params, response.text)
