"""The python-socketio adapter on the synchronous ``socketio.Server`` (threading mode), served
by Werkzeug's threaded WSGI server on loopback, with real ``AsyncClient`` clients."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import socketio
from socketio_support import until
from werkzeug.serving import make_server

from emitguard import AdapterError, ConnectionState, Outcome
from emitguard_adapters.socketio import guard_server

CONVERSATIONS, EVENTS = 30, 15


@contextlib.contextmanager
def running(sio: socketio.Server) -> Iterator[str]:
    """Serve ``sio`` (its WSGI app, Werkzeug, a thread per request); yields its URL."""
    server = make_server("127.0.0.1", 0, socketio.WSGIApp(sio), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()


def joining_server() -> socketio.Server:
    sio = socketio.Server(async_mode="threading")

    @sio.event
    def join(sid: str, room: str) -> None:
        sio.enter_room(sid, room)

    return sio


def test_emits_before_the_join_arrive_in_order_and_broadcasts_pass() -> None:
    sio = joining_server()
    adapter = guard_server(sio)
    got: list[tuple[str, Any]] = []

    async def client(url: str) -> None:
        c = socketio.AsyncClient()
        c.on("*", lambda event, *args: got.append((event, args[0] if args else None)))
        await c.connect(url, transports=["websocket"])
        await c.call("join", "r1")
        sio.emit("token", 4, to="r1")
        sio.emit("news", "all")  # a broadcast: passed through
        sio.emit("token", 5, room="r1", namespace="/other")  # another namespace: kept apart
        await until(lambda: len(got) >= 5)
        await c.disconnect()

    with running(sio) as url:
        for n in range(1, 4):
            sio.emit("token", n, to="r1")  # nobody in r1 yet: buffered at once, no wait
        assert adapter.guard.stats().pending == {("/", "r1"): 3}
        asyncio.run(client(url))
    assert got == [("token", 1), ("token", 2), ("token", 3), ("token", 4), ("news", "all")]
    stats = adapter.guard.stats()
    assert stats.outcomes[Outcome.FLUSHED] == 3
    assert stats.outcomes[Outcome.DELIVERED] == 1
    assert stats.passed_through == 1
    assert stats.pending == {("/other", "r1"): 1}
    assert adapter.guard.state(("/", "r1")) is ConnectionState.DISCONNECTED
    adapter.unguard()
    assert "emit" not in vars(sio)


def test_an_emit_into_a_room_whose_socket_is_gone_is_kept() -> None:
    sio = joining_server()
    adapter = guard_server(sio, retry_backoff=())

    async def client(url: str) -> None:
        c = socketio.AsyncClient(reconnection=False)
        await c.connect(url, transports=["websocket"])
        await c.call("join", "r1")
        eio_sid = next(iter(sio.manager.rooms["/"]["r1"].values()))
        sio.eio.sockets[eio_sid].closed = True  # gone, before socketio heard of it
        sio.emit("token", 1, to="r1")
        await c.disconnect()

    with running(sio) as url:
        asyncio.run(client(url))
    stats = adapter.guard.stats()
    assert stats.outcomes[Outcome.DELIVERED] == 0
    assert stats.pending_total == 1  # kept, not counted as delivered
    adapter.unguard()


def test_recovery_needs_the_async_server() -> None:
    with pytest.raises(AdapterError, match="recovery=True needs a python-socketio AsyncServer"):
        guard_server(socketio.Server(async_mode="threading"), recovery=True)


@pytest.mark.parametrize("guarded", [True, False])
def test_thirty_conversations_agents_emitting_before_the_join(guarded: bool) -> None:
    """30 conversations x 15 events from agent threads that start emitting before their
    client has connected and joined (each client a moment later)."""
    sio = joining_server()
    adapter = guard_server(sio) if guarded else None
    received: dict[str, list[int]] = {f"conv-{i}": [] for i in range(CONVERSATIONS)}

    def agent(room: str) -> None:
        for n in range(1, EVENTS + 1):
            sio.emit("agent_event", {"n": n}, to=room)
            threading.Event().wait(0.005)

    async def conversation(url: str, index: int) -> None:
        room = f"conv-{index}"
        await asyncio.sleep(0.002 * index)
        c = socketio.AsyncClient()
        c.on("agent_event", lambda data: received[room].append(data["n"]))
        await c.connect(url, transports=["websocket"])
        await c.call("join", room)
        await until(lambda: len(received[room]) >= EVENTS, timeout=1.0 if not guarded else 10.0)

    async def clients(url: str) -> None:
        results = await asyncio.gather(
            *(conversation(url, i) for i in range(CONVERSATIONS)), return_exceptions=True
        )
        if guarded:
            assert [r for r in results if r is not None] == []

    with running(sio) as url:
        agents = [
            threading.Thread(target=agent, args=(room,)) for room in received
        ]
        for thread in agents:
            thread.start()
        asyncio.run(clients(url))
        for thread in agents:
            thread.join(10)
    lost = sum(EVENTS - len(set(got)) for got in received.values())
    if guarded:
        assert adapter is not None
        assert lost == 0
        assert all(got == list(range(1, EVENTS + 1)) for got in received.values())
        assert adapter.guard.stats().pending_total == 0
        adapter.unguard()
    else:
        assert lost > 0  # the race the guard closes
