"""The Starlette adapter over real sockets: uvicorn on loopback, clients from ``websockets``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import emitguard
from conftest import Records, eventually
from emitguard import Guard, Outcome
from emitguard_adapters.starlette import EmitGuardMiddleware, ThreadHub, allow_any
from emitguard_adapters.testing import LegacyWebSocketManager, legacy_app, serve


async def read_until(ws: ClientConnection, last: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        got.append(message)
        if message["type"] == last:
            return got


async def agent_run(address: str, thread_id: str, events: int) -> list[dict[str, Any]]:
    async with connect(f"ws://{address}/ws") as ws:
        start = {"user_id": f"user-{thread_id}", "thread_id": thread_id, "events": events}
        await ws.send(json.dumps({**start, "gap": 0.005}))
        return await read_until(ws, "agent_completed")


EXPECTED = [{"type": "agent_update", "n": n} for n in range(6)] + [{"type": "agent_completed"}]


# ------------------------------------------------------------------ legacy managers


async def test_unguarded_the_report_race_loses_the_first_events() -> None:
    manager = LegacyWebSocketManager()
    async with serve(legacy_app(manager, lag=0.02)) as address:
        got = await agent_run(address, "t1", 6)
    assert manager.lost >= 1
    assert got[-1] == {"type": "agent_completed"}
    assert got[0] != EXPECTED[0]


@contextlib.asynccontextmanager
async def guarded_legacy(
    manager: LegacyWebSocketManager,
    *,
    lag: float = 0.02,
    confirm_timeout: float = 0.05,
    **guard_options: Any,
) -> AsyncIterator[tuple[Guard, str]]:
    """The report's legacy app, guarded in the two lines the docs show, under uvicorn."""
    guard = emitguard.guard(manager, **guard_options)
    try:
        app = EmitGuardMiddleware(
            legacy_app(manager, lag=lag), guard=guard, confirm_timeout=confirm_timeout
        )
        async with serve(app) as address:
            yield guard, address
    finally:
        emitguard.unguard(manager)


async def test_guarded_with_the_middleware_every_event_arrives_in_order(records: Records) -> None:
    manager = LegacyWebSocketManager()
    async with guarded_legacy(manager) as (guard, address):
        records.guard = guard
        runs = await asyncio.gather(*(agent_run(address, f"t{i}", 6) for i in range(5)))
    assert all(got == EXPECTED for got in runs)
    assert manager.lost == 0
    assert {r.outcome for r in records.items} == {Outcome.DELIVERED}
    assert len(records.items) == 5 * len(EXPECTED)


async def test_a_manager_that_lies_about_success_is_caught(records: Records) -> None:
    manager = LegacyWebSocketManager(testing=True)
    lying = guarded_legacy(manager, lag=0.0, confirm_timeout=0.01, ttl=None)
    async with lying as (guard, address), connect(f"ws://{address}/ws") as ws:
        records.guard = guard
        await ws.send(json.dumps({"user_id": "u1", "thread_id": "t1", "events": 2}))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)
        assert guard.stats().pending == {"t1": 3}
    assert Outcome.DELIVERED not in {r.outcome for r in records.items}
    buffered = records.of(Outcome.BUFFERED)
    assert buffered
    assert buffered[0].reason is not None
    assert buffered[0].reason.startswith("unconfirmed: the send reported success")


async def test_a_closed_connection_disconnects_its_threads() -> None:
    manager = LegacyWebSocketManager()
    async with guarded_legacy(manager, lag=0.0) as (guard, address):
        assert len(await agent_run(address, "t1", 1)) == 2
        await eventually(lambda: guard.state("t1") is emitguard.ConnectionState.DISCONNECTED)
        assert await manager.send_to_thread("t1", {"type": "late"}) is True  # kept
        assert guard.stats().pending == {"t1": 1}


async def test_http_and_other_websockets_pass_through_untouched() -> None:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello", headers={"x-app": "1"})

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    guard = Guard()
    app = Starlette(routes=[Route("/hello", hello), WebSocketRoute("/echo", echo)])
    async with serve(EmitGuardMiddleware(app, guard=guard)) as address:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://{address}/hello")
        assert (response.status_code, response.text) == (200, "hello")
        assert response.headers["x-app"] == "1"
        async with connect(f"ws://{address}/echo") as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
    assert list(guard.threads()) == []
    assert sum(guard.stats().outcomes.values()) == 0


# ---------------------------------------------------------------------- the hub


def hub_app(hub: ThreadHub) -> Starlette:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        hello = await websocket.receive_json()
        if not await hub.attach(websocket, hello["thread_id"], hello.get("last_seq")):
            return
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            await hub.detach(websocket)

    return Starlette(routes=[WebSocketRoute("/hub", endpoint)])


@pytest.fixture
async def hub_server() -> AsyncIterator[tuple[ThreadHub, str]]:
    hub = ThreadHub(authorize=allow_any, history=100)
    async with serve(EmitGuardMiddleware(hub_app(hub), guard=hub.guard)) as address:
        yield hub, address


async def attach(address: str, thread_id: str, last_seq: int | None = None) -> ClientConnection:
    ws = await connect(f"ws://{address}/hub")
    await ws.send(json.dumps({"thread_id": thread_id, "last_seq": last_seq}))
    return ws


async def test_a_killed_client_reconnects_and_gets_every_event_once_in_order(
    hub_server: tuple[ThreadHub, str],
) -> None:
    hub, address = hub_server
    total = 60

    async def agent() -> None:
        for n in range(total):
            await hub.send("t1", {"type": "agent_update", "n": n})
            await asyncio.sleep(0.002)

    ws = await attach(address, "t1")
    await eventually(lambda: hub.connections("t1"))
    running = asyncio.create_task(agent())
    seen: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    while len(order) < 10:
        message = json.loads(await asyncio.wait_for(ws.recv(), 3))
        seen.setdefault(message["seq"], message)
        order.append(message["seq"])
    ws.transport.abort()  # killed: no close handshake
    await asyncio.sleep(0.05)
    ws = await attach(address, "t1", last_seq=max(seen))
    await running
    while max(seen) < total:
        message = json.loads(await asyncio.wait_for(ws.recv(), 3))
        assert message["type"] != "resync"
        if message["seq"] not in seen:
            seen[message["seq"]] = message
            order.append(message["seq"])
    await ws.close()
    assert sorted(seen) == list(range(1, total + 1))
    assert order == sorted(order)  # after dropping duplicates, nothing came out of order
    assert [seen[seq]["n"] for seq in sorted(seen)] == list(range(total))


async def test_a_client_beyond_the_window_is_told_to_resync() -> None:
    hub = ThreadHub(authorize=allow_any, history=3)
    async with serve(EmitGuardMiddleware(hub_app(hub), guard=hub.guard)) as address:
        first = await attach(address, "t1")
        await eventually(lambda: hub.connections("t1"))
        for n in range(10):
            assert await hub.send("t1", {"type": "agent_update", "n": n})
        late = await attach(address, "t1", last_seq=2)
        resync = json.loads(await asyncio.wait_for(late.recv(), 3))
        assert resync == {
            "type": "resync",
            "thread_id": "t1",
            "last_seq": 2,
            "latest_seq": 10,
            "recovered": False,
        }
        assert await hub.send("t1", {"type": "agent_completed"})
        live = json.loads(await asyncio.wait_for(late.recv(), 3))
        assert live == {"type": "agent_completed", "seq": 11}
        await first.close()
        await late.close()


async def test_a_client_within_the_window_gets_what_it_missed_first(
    hub_server: tuple[ThreadHub, str],
) -> None:
    hub, address = hub_server
    first = await attach(address, "t1")
    await eventually(lambda: hub.connections("t1"))
    for n in range(5):
        assert await hub.send("t1", {"type": "agent_update", "n": n})
    late = await attach(address, "t1", last_seq=2)
    got = [json.loads(await asyncio.wait_for(late.recv(), 3)) for _ in range(3)]
    assert [m["seq"] for m in got] == [3, 4, 5]
    await first.close()
    await late.close()


async def test_authorization_refusal_closes_with_1008() -> None:
    async def authorize(websocket: WebSocket, thread_id: str) -> bool:
        return thread_id != "secret"

    hub = ThreadHub(authorize=authorize)
    async with serve(hub_app(hub)) as address:
        ws = await attach(address, "secret")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 3)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == "not allowed to read thread secret"
        assert hub.connections("secret") == 0
        assert await hub.send("secret", {"type": "agent_update"})  # buffered, not delivered
        assert hub.guard.stats().pending == {"secret": 1}


def test_hub_and_middleware_refuse_bad_setup() -> None:
    with pytest.raises(TypeError, match="authorize must be callable"):
        ThreadHub(authorize=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a guard built with stamp_seq= and history="):
        ThreadHub(authorize=allow_any, guard=Guard())
    with pytest.raises(TypeError, match=r"guard must be an emitguard\.Guard"):
        EmitGuardMiddleware(hub_app(ThreadHub(authorize=allow_any)), guard="g")  # type: ignore[arg-type]


async def test_a_bad_hello_is_refused_with_1008_not_raised() -> None:
    hub = ThreadHub(authorize=allow_any)
    async with serve(hub_app(hub)) as address:
        for thread_id, last_seq, reason in [
            ("t1", "7", "last_seq must be an int >= 0 or null, got '7'"),
            ("t1", -1, "last_seq must be an int >= 0 or null, got -1"),
            ("", None, "thread_id must be a non-empty string, got ''"),
        ]:
            ws = await attach(address, thread_id, last_seq)  # type: ignore[arg-type]
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 3)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, reason)


class SpawningManager(LegacyWebSocketManager):
    """Sends from tasks it spawns and reports success before they ran (fire and forget)."""

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        sockets = [self._sockets[c][1] for c, t in self._thread_of.items() if t == thread_id]
        if not sockets:
            return False
        for websocket in sockets:
            asyncio.get_running_loop().create_task(websocket.send_json(message))
        return True


@pytest.mark.parametrize("listening", [False, True], ids=["fast path", "general path"])
async def test_frames_sent_by_tasks_the_manager_spawns_confirm_the_delivery(
    listening: bool,
) -> None:
    manager = SpawningManager()
    async with guarded_legacy(manager) as (guard, address):
        listener = Records(guard)
        if listening:  # a listener sends every delivery through the general path
            emitguard.register(listener)
        try:
            assert await agent_run(address, "t1", 6) == EXPECTED
        finally:
            if listening:
                emitguard.unregister(listener)
        outcomes = guard.stats().outcomes
    assert outcomes[Outcome.DELIVERED] == len(EXPECTED)
    assert outcomes[Outcome.BUFFERED] == 0


async def test_a_thread_stays_connected_while_another_connection_carries_it() -> None:
    manager = LegacyWebSocketManager()
    async with guarded_legacy(manager, lag=0.0) as (guard, address):
        hello = {"user_id": "u1", "thread_id": "t1", "events": 0}
        first = await connect(f"ws://{address}/ws")
        await first.send(json.dumps(hello))
        await read_until(first, "agent_completed")
        second = await connect(f"ws://{address}/ws")
        await second.send(json.dumps(hello))  # its run's event goes to the first one
        await read_until(first, "agent_completed")
        await asyncio.sleep(0.05)  # the second connection is associated by now
        await first.close()
        await asyncio.sleep(0.1)
        assert guard.state("t1") is emitguard.ConnectionState.CONNECTED
        assert await manager.send_to_thread("t1", {"type": "still_here"})
        assert json.loads(await asyncio.wait_for(second.recv(), 3)) == {"type": "still_here"}
        await second.close()
        await eventually(lambda: guard.state("t1") is emitguard.ConnectionState.DISCONNECTED)


async def test_a_message_that_does_not_serialise_fails_without_cutting_anyone_off(
    hub_server: tuple[ThreadHub, str],
) -> None:
    """Found in review: the hub blamed (and detached) every socket for a message json could
    not encode, and the message blocked the thread until its ttl."""
    hub, address = hub_server
    ws = await attach(address, "t1")
    await until_attached(hub, "t1")
    assert await hub.send("t1", {"type": "bad", "when": {1, 2}}) is False  # a set: no JSON
    assert await hub.send("t1", {"type": "good"})
    assert json.loads(await asyncio.wait_for(ws.recv(), 3)) == {"type": "good", "seq": 2}
    assert hub.connections("t1") == 1
    stats = hub.guard.stats()
    assert stats.outcomes[Outcome.FAILED] == 1
    assert stats.pending == {}
    await ws.close()


async def test_a_long_refusal_reason_is_cut_to_the_protocol_limit() -> None:
    hub = ThreadHub(authorize=lambda websocket, thread_id: False)
    async with serve(hub_app(hub)) as address:
        ws = await attach(address, "a" * 128)  # the longest valid thread id
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 3)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    reason = closed.value.rcvd.reason
    assert reason.startswith("not allowed to read thread aaa")
    assert reason.endswith("...")
    assert len(reason.encode()) <= 123


async def test_attaching_the_same_socket_twice_is_one_attachment() -> None:
    hub = ThreadHub(authorize=allow_any)

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await hub.attach(websocket, "t1")
        await hub.attach(websocket, "t1")
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            await hub.detach(websocket)

    async with serve(Starlette(routes=[WebSocketRoute("/hub", endpoint)])) as address:
        ws = await connect(f"ws://{address}/hub")
        await until_attached(hub, "t1")
        assert hub.connections("t1") == 1
        assert await hub.send("t1", {"type": "once"})
        assert json.loads(await asyncio.wait_for(ws.recv(), 3)) == {"type": "once", "seq": 1}
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.2)
        await ws.close()
        await eventually(lambda: not hub.connections("t1"))
        assert hub.connections("t1") == 0


class WriterQueueManager(LegacyWebSocketManager):
    """Queues each frame for a per-socket writer task started at connect time."""

    def __init__(self) -> None:
        super().__init__()
        self.queues: dict[str, asyncio.Queue[Any]] = {}
        self.writers: set[asyncio.Task[None]] = set()

    def connect(self, websocket: WebSocket, user_id: str) -> str:
        connection_id = super().connect(websocket, user_id)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[connection_id] = queue

        async def writer() -> None:
            while True:
                await websocket.send_json(await queue.get())

        self.writers.add(asyncio.get_running_loop().create_task(writer()))
        return connection_id

    def disconnect(self, connection_id: str) -> None:
        super().disconnect(connection_id)
        self.queues.pop(connection_id, None)

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        targets = [c for c, t in self._thread_of.items() if t == thread_id]
        for connection_id in targets:
            self.queues[connection_id].put_nowait(message)
        return bool(targets)


async def test_a_writer_task_started_at_connect_time_is_confirmed() -> None:
    """Found in review: its frames carry no probe, so every send looked unconfirmed."""
    manager = WriterQueueManager()
    try:
        async with guarded_legacy(manager) as (guard, address):
            assert await agent_run(address, "t1", 6) == EXPECTED
            outcomes = guard.stats().outcomes
    finally:
        for task in manager.writers:
            task.cancel()
    assert outcomes[Outcome.BUFFERED] == 0
    assert outcomes[Outcome.DELIVERED] == len(EXPECTED)


async def until_attached(hub: ThreadHub, thread_id: str) -> None:
    await eventually(lambda: hub.connections(thread_id) > 0)
