"""The python-socketio adapter over real servers and clients on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
import socketio
from socketio_support import abort, client, running, until

from emitguard import ConnectionState, Outcome
from emitguard_adapters.socketio import Recovery, guard_server, recovering


async def test_rooms_broadcasts_sid_rooms_and_namespaces() -> None:
    sio = socketio.AsyncServer(async_mode="asgi")
    guarded = guard_server(sio, ready_timeout=0.5)
    got: list[tuple[str, Any]] = []

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        started = time.monotonic()
        await sio.emit("welcome", {"sid": sid}, to=sid)  # its own room, inside connect
        assert time.monotonic() - started < 0.05  # the framework entered it: no wait

    @sio.event
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)

    async with running(sio) as url:
        early = asyncio.create_task(sio.emit("token", {"n": 1}, to="r1"))  # nobody in r1
        c = client()
        c.on("*", lambda event, *args: got.append((event, args[0] if args else None)))
        await c.connect(url, transports=["websocket"])
        await c.emit("join", "r1")
        await early
        await sio.emit("token", {"n": 2}, room="r1")
        await sio.emit("news", "all")  # a broadcast: passed through
        await sio.emit("token", {"n": 3}, to="r1", namespace="/other")  # another namespace
        await until(lambda: len(got) >= 4)
        await c.disconnect()
    events = [(e, d) for e, d in got if e != "welcome"]
    assert events == [("token", {"n": 1}), ("token", {"n": 2}), ("news", "all")]
    assert guarded.guard.stats().passed_through == 1
    assert guarded.guard.state(("/", "r1")) is ConnectionState.DISCONNECTED  # the member left
    assert guarded.guard.stats().pending == {("/other", "r1"): 1}  # nobody there: kept
    guarded.unguard()
    await guarded.guard.aclose()
    assert "emit" not in vars(sio)


async def test_an_emit_into_a_room_whose_socket_is_gone_is_kept() -> None:
    sio = socketio.AsyncServer(async_mode="asgi")
    guarded = guard_server(sio, retry_backoff=())
    rooms: dict[str, str] = {}

    @sio.event
    async def join(sid: str, room: str) -> None:
        rooms[sid] = room
        await sio.enter_room(sid, room)

    async with running(sio) as url:
        got: list[Any] = []
        c = client(reconnection=False)
        c.on("token", got.append)
        await c.connect(url, transports=["websocket"])
        await c.emit("join", "r1")
        await until(lambda: guarded.guard.state(("/", "r1")) is ConnectionState.CONNECTED)
        sid = next(iter(rooms))
        eio_sid = sio.manager.eio_sid_from_sid(sid, "/")
        sio.eio.sockets[eio_sid].closed = True  # gone, before socketio heard of it
        await sio.emit("token", 1, to="r1")
        stats = guarded.guard.stats()
        assert stats.pending_total == 1  # kept, not counted as delivered
        assert stats.outcomes[Outcome.DELIVERED] == 0
        assert got == []
        await c.disconnect()
    guarded.unguard()
    await guarded.guard.aclose()


@pytest.mark.parametrize("shape", ["sid-room-replay", "join-handler"])
async def test_shapes_thirty_conversations_every_third_client_dropping(shape: str) -> None:
    guarded_lost, connects = await conversations(shape, guarded=True)
    unguarded_lost, _ = await conversations(shape, guarded=False)
    print(
        f"\nsocketio {shape}: unguarded lost {unguarded_lost} of 450, guarded lost "
        f"{guarded_lost}; connect max {max(connects) * 1000:.1f} ms"
    )
    assert guarded_lost == 0
    assert unguarded_lost > 0
    # No connect handler waits on a barrier (ready_timeout is 2 s): 9 in 10 take under the
    # issue's 50 ms (typically a few ms), and the bound on the slowest leaves room for a
    # worker descheduled by a parallel test (Node, subprocesses).
    assert sorted(connects)[len(connects) * 9 // 10] < 0.05
    assert max(connects) < 0.25


RUNS, EVENTS, DROP_AT = 30, 15, 5


async def conversations(shape: str, *, guarded: bool) -> tuple[int, list[float]]:
    """30 conversations x 15 events: each agent emits to its room from the start, its client
    connects a moment later and joins; every third client's transport is killed after 5
    events and it reconnects. Returns the events lost (after seq dedupe) and the connect
    handler times."""
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, ready_timeout=2.0) if guarded else None
    connects: list[float] = []
    history: dict[str, list[int]] = {}

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        started = time.perf_counter()
        if shape == "sid-room-replay":  # replay to the client's own sid room, before it joins
            await sio.emit("hello", {"replayed": len(history)}, to=sid)
        connects.append(time.perf_counter() - started)

    @sio.event
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)
        if shape == "join-handler":
            await sio.emit("joined", room, to=sid)

    async def agent(room: str) -> None:
        for n in range(1, EVENTS + 1):
            await sio.emit("agent_event", {"n": n}, to=room)
            await asyncio.sleep(0.01)

    async def conversation(url: str, index: int) -> list[int]:
        room = f"conv-{index}"
        received: list[int] = []
        c = client()
        state = recovering(c) if guarded else None
        first = True

        @c.event
        async def connect() -> None:
            nonlocal first
            if first or state is None or not state.recovered:  # a recovered one is back in
                first = False
                await c.emit("join", room)

        @c.on("agent_event")
        async def on_event(data: dict[str, Any]) -> None:
            received.append(data["n"])
            if index % 3 == 0 and len(received) == DROP_AT:
                abort(c)

        work = asyncio.create_task(agent(room))
        await asyncio.sleep(0.005 * (index % 6))  # the agent starts first
        auth = state.auth if state is not None else None
        await c.connect(url, transports=["websocket"], auth=auth)
        await work
        with contextlib.suppress(AssertionError):  # unguarded, some never come
            await until(lambda: len(set(received)) >= EVENTS, timeout=3.0)
        await c.disconnect()
        assert received == sorted(received), received  # in order, no duplicates
        return received

    try:
        async with running(sio) as url:
            results = await asyncio.gather(*(conversation(url, i) for i in range(RUNS)))
            if adapter is not None:
                assert await adapter.guard.drain(2.0) == 0
    finally:
        if adapter is not None:
            adapter.unguard()
    lost = sum(EVENTS - len(set(r)) for r in results)
    duplicates = sum(len(r) - len(set(r)) for r in results)
    assert duplicates == 0
    return lost, connects


async def test_recovery_replays_what_a_client_missed_in_order() -> None:
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, history=500, max_disconnection_duration=5.0)

    @sio.event
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)

    async with running(sio) as url:
        received: list[int] = []
        c = client(reconnection_delay=2.0, reconnection_delay_max=2.0)
        state = recovering(c)
        c.on("tick", lambda data: received.append(data["n"]))
        await c.connect(url, transports=["websocket"], auth=state.auth)
        await c.emit("join", "room-1")
        await until(lambda: adapter.guard.state(("/", "room-1")) is ConnectionState.CONNECTED)
        await sio.emit("tick", {"n": 0}, to="room-1")
        await until(lambda: received == [0])
        abort(c)  # away for 2 s (the reconnection delay)
        await until(lambda: adapter.guard.state(("/", "room-1")) is not ConnectionState.CONNECTED)
        for n in range(1, 101):
            await sio.emit("tick", {"n": n}, to="room-1")
        await until(lambda: len(received) >= 101, timeout=6.0)
        assert state.recovered is True
        assert received == list(range(101))
        assert state.duplicates == 0
        await c.disconnect()
    adapter.unguard()


async def test_away_longer_than_allowed_is_a_fresh_session_with_no_replay() -> None:
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, history=10, max_disconnection_duration=0.2)

    @sio.event
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)

    async with running(sio) as url:
        received: list[int] = []
        c = client(reconnection_delay=0.5, reconnection_delay_max=0.5)
        state = recovering(c)
        sessions: list[tuple[str | None, bool]] = []

        @c.event
        async def connect() -> None:
            sessions.append((c.get_sid(), state.recovered))
            if not state.recovered:
                await c.emit("join", "room-1")  # the app joins again when not recovered

        c.on("tick", lambda data: received.append(data["n"]))
        await c.connect(url, transports=["websocket"], auth=state.auth)
        await until(lambda: adapter.guard.state(("/", "room-1")) is ConnectionState.CONNECTED)
        await sio.emit("tick", {"n": 0}, to="room-1")
        await until(lambda: received == [0])
        first_pid = state.pid
        abort(c)
        await until(lambda: adapter.guard.state(("/", "room-1")) is not ConnectionState.CONNECTED)
        for n in range(1, 4):  # delivered nowhere: kept in the room's outbox
            await sio.emit("tick", {"n": n}, to="room-1")
        await until(lambda: len(sessions) == 2, timeout=3.0)
        assert sessions[1][1] is False  # not recovered: a fresh session
        assert sessions[1][0] != sessions[0][0]
        assert state.pid != first_pid
        await until(lambda: received[-1:] == [3])  # the outbox flushes on the new join
        assert received == [0, 1, 2, 3]
        await c.disconnect()
    adapter.unguard()


async def noted(
    sio: socketio.AsyncServer, url: str, **options: Any
) -> tuple[socketio.AsyncClient, Recovery, str, list[int]]:
    """A recovering client that has received one "note" (its offset) in its sid room."""
    got: list[int] = []
    c = client(**options)
    state = recovering(c)
    c.on("note", got.append)
    await c.connect(url, transports=["websocket"], auth=state.auth)
    sid = c.get_sid()
    assert sid is not None
    await sio.emit("note", 0, to=sid)
    await until(lambda: got == [0])
    return c, state, sid, got


@pytest.mark.parametrize("skip", [True, False], ids=["skip-handler", "run-handler"])
async def test_a_recovered_session_keeps_its_sid_and_what_was_sent_to_it(skip: bool) -> None:
    """The sid survives recovery, so events sent to the client's own sid room while it was
    away reach it; the app's connect handler runs again only with ``skip_connect_handler``
    off (and can tell the session is recovered)."""
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, history=100, skip_connect_handler=skip)
    handled: list[tuple[str, bool]] = []

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        handled.append((sid, adapter.recovered(sid)))

    async with running(sio) as url:
        c, state, sid, got = await noted(
            sio, url, reconnection_delay=0.3, reconnection_delay_max=0.3
        )
        abort(c)
        await until(lambda: not sio.manager.is_connected(sid, "/"))
        for n in range(1, 6):  # to its sid room while it is away
            await sio.emit("note", n, to=sid)
        await until(lambda: got == [0, 1, 2, 3, 4, 5])
        assert state.recovered is True
        assert c.get_sid() == sid
        await c.disconnect()
    adapter.unguard()
    assert handled == ([(sid, False)] if skip else [(sid, False), (sid, True)])


@pytest.mark.parametrize("who", ["client", "server"])
async def test_a_disconnect_on_purpose_ends_the_session(who: str) -> None:
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, history=100)
    async with running(sio) as url:
        c, state, sid, _ = await noted(sio, url, reconnection=False)
        if who == "client":
            await c.disconnect()
        else:
            await sio.disconnect(sid)
            await until(lambda: not c.connected)
        await c.connect(url, transports=["websocket"], auth=state.auth)
        assert state.recovered is False
        assert c.get_sid() != sid
        await c.disconnect()
    adapter.unguard()


async def test_broadcasts_carry_offsets_and_keep_the_client_position_right() -> None:
    """A broadcast is not replayed, but its offset is a place in the write order: a client
    whose last event was a broadcast recovers the room events that followed it."""
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, history=100)

    @sio.event
    async def join(sid: str, room: str) -> bool:
        await sio.enter_room(sid, room)
        return True

    async with running(sio) as url:
        watcher = client()
        await watcher.connect(url, transports=["websocket"])
        await watcher.call("join", "room-1")
        got: list[Any] = []
        c = client(reconnection_delay=0.3, reconnection_delay_max=0.3)
        state = recovering(c)
        c.on("*", lambda event, *args: got.append((event, *args)))
        await c.connect(url, transports=["websocket"], auth=state.auth)
        await c.call("join", "room-1")
        await sio.emit("tick", 1, to="room-1")
        await sio.emit("news", "all")  # a broadcast: the client's last offset
        await until(lambda: len(got) == 2)
        abort(c)
        await until(lambda: len(sio.manager.rooms["/"]["room-1"]) == 1)
        for n in range(2, 5):  # delivered to the watcher: kept in the window
            await sio.emit("tick", n, to="room-1")
        await until(lambda: len(got) == 5)
        assert state.recovered is True
        assert got == [("tick", 1), ("news", "all"), ("tick", 2), ("tick", 3), ("tick", 4)]
        await c.disconnect()
        await watcher.disconnect()
    adapter.unguard()


async def test_a_connect_handler_that_refuses_gets_no_replay() -> None:
    """With ``skip_connect_handler=False`` the app's connect handler authorises a recovery:
    when it refuses, the client is not recovered and none of what it missed is even sent."""
    sio = socketio.AsyncServer(async_mode="asgi")
    adapter = guard_server(sio, recovery=True, history=100, skip_connect_handler=False)
    refusing = False

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        if refusing:
            raise socketio.exceptions.ConnectionRefusedError("token revoked")

    @sio.event
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)

    async with running(sio) as url:
        observer = client()  # stays in the room: what the other misses is delivered, kept
        await observer.connect(url, transports=["websocket"])
        await observer.call("join", "r")
        got: list[int] = []
        c = client(reconnection=False)
        state = recovering(c)
        c.on("note", got.append)
        await c.connect(url, transports=["websocket"], auth=state.auth)
        await c.call("join", "r")
        await sio.emit("note", 0, to="r")
        await until(lambda: got == [0])
        sid = c.get_sid()
        abort(c)
        await until(lambda: not sio.manager.is_connected(sid, "/"))
        for n in range(1, 4):  # missed while away (delivered to the observer: in the window)
            await sio.emit("note", n, to="r")
        refusing = True
        wire: list[str] = []  # every Socket.IO packet the client is sent, as it arrives
        handle = c.eio.handlers["message"]  # (python-socketio's, on its Engine.IO client)

        async def recording(data: Any) -> None:
            wire.append(data)
            await handle(data)

        c.eio.handlers["message"] = recording
        with pytest.raises(socketio.exceptions.ConnectionError):
            await c.connect(url, transports=["websocket"], auth=state.auth)
        await asyncio.sleep(0.2)
        assert wire  # (the refusal)
        assert all("note" not in packet for packet in wire)  # none was even sent
        assert got == [0]
        assert state.recovered is False
        assert not sio.manager.is_connected(sid, "/")
        refusing = False  # a refused recovery used the session up: a fresh one now
        await c.connect(url, transports=["websocket"], auth=state.auth)
        assert state.recovered is False
        assert c.get_sid() != sid
        await asyncio.sleep(0.1)
        assert got == [0]
        await c.disconnect()
        await observer.disconnect()
    adapter.unguard()
    await adapter.guard.aclose()


async def test_a_member_that_leaves_is_not_taken_for_a_live_one() -> None:
    """The liveness check remembers a live member's socket per room: once the member leaves
    (its socket still open), an emit to the room that is empty now is kept, not counted
    delivered; once it is back in the room, what was kept is delivered."""
    sio = socketio.AsyncServer(async_mode="asgi")
    guarded = guard_server(sio, retry_backoff=(), ready_timeout=0.1)

    @sio.event
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)

    @sio.event
    async def leave(sid: str, room: str) -> None:
        await sio.leave_room(sid, room)

    async with running(sio) as url:
        got: list[int] = []
        c = client()
        c.on("token", got.append)
        await c.connect(url, transports=["websocket"])
        await c.call("join", "r1")
        await sio.emit("token", 1, to="r1")  # delivered: its socket is remembered
        await until(lambda: got == [1])
        await c.call("leave", "r1")
        sio.manager.basic_enter_room("ghost", "/", "r1", eio_sid="gone")  # a member with no
        await sio.emit("token", 2, to="r1")  # live socket: the room is not empty, yet dead
        assert guarded.guard.stats().pending_total == 1
        sio.manager.basic_leave_room("ghost", "/", "r1")
        await c.call("join", "r1")
        await until(lambda: got == [1, 2])
        await c.disconnect()
    guarded.unguard()
    await guarded.guard.aclose()
