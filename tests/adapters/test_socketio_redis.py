"""python-socketio on the Redis outbox: room emits and connection state recovery across
worker processes. A real redis-server on a free port, real uvicorn worker processes
(``tests/redis_sio_worker.py``), real ``socketio.AsyncClient`` clients with ``recovering()``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from socketio_support import until

from emitguard_adapters.socketio import Recovery, recovering
from redis_support import AppWorker, RedisServer

SIO = Path(__file__).parent.parent / "redis_sio_worker.py"


@pytest.fixture
def workers(redis_server: RedisServer) -> Any:
    started: list[AppWorker] = []

    def start(count: int, *, away: float = 30.0, query: str = "") -> list[AppWorker]:
        url = redis_server.url + query
        started.extend(AppWorker(SIO, url, str(away)) for _ in range(count))
        return started[-count:]

    yield start
    for worker in started:
        worker.stop()


class Listener:
    """A recovering ``AsyncClient`` that records every "tick" it gets and its sessions."""

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.state: Recovery = recovering(self.client)
        self.got: list[int] = []
        self.sessions: list[tuple[str | None, bool]] = []
        self.client.on("tick", lambda data: self.got.append(data["n"]))
        self.client.on("connect", self._connected)

    def _connected(self) -> None:
        self.sessions.append((self.client.get_sid(), self.state.recovered))

    async def connect(self, worker: AppWorker, room: str | None = None) -> None:
        await self.client.connect(worker.http, transports=["websocket"], auth=self.state.auth)
        if room is not None:
            assert await self.client.call("join", room) is True


async def emit(
    worker: AppWorker, room: str, count: int, start: int = 0, interval: float = 0.0
) -> None:
    async with httpx.AsyncClient(base_url=worker.http) as http:
        order = {"room": room, "count": count, "start": start, "interval": interval}
        assert (await http.post("/emit", json=order)).status_code == 200


async def test_a_client_whose_worker_is_killed_recovers_on_another_with_every_event_once(
    workers: Any,
) -> None:
    # The agent emits in A to the client's room; the client is on B; B is killed -9
    # mid-stream; the client comes back on C with its pid and offset: recovered, same sid,
    # every event once in order (those emitted while it was away included), live after.
    agent, first, second = workers(3)
    listener = Listener()
    await listener.connect(first, "room-1")
    sid = listener.client.get_sid()
    await emit(agent, "room-1", 300, interval=0.005)
    await until(lambda: len(listener.got) >= 80, timeout=10)
    first.kill()
    await until(lambda: not listener.client.connected, timeout=5)
    at_kill = len(listener.got)
    await asyncio.sleep(0.5)  # away while the agent goes on emitting
    await listener.connect(second)  # no join: a recovered session is back in its rooms
    assert listener.state.recovered is True
    assert listener.client.get_sid() == sid
    await until(lambda: len(listener.got) >= 300, timeout=15)
    await emit(agent, "room-1", 20, start=300)  # live, on C
    await until(lambda: len(listener.got) >= 320, timeout=10)
    await asyncio.sleep(0.3)  # anything written twice would arrive now
    await listener.client.disconnect()
    assert at_kill < 300
    assert listener.got == list(range(320))
    assert listener.state.duplicates == 0
    assert listener.sessions == [(sid, False), (sid, True)]


async def test_away_too_long_or_past_the_window_is_a_fresh_session_with_no_replay(
    workers: Any,
) -> None:
    agent, first, second = workers(3, away=1.0, query="?maxlen=20")
    # away longer than max_disconnection_duration (its worker killed meanwhile)
    late = Listener()
    await late.connect(first, "room-late")
    await emit(agent, "room-late", 5)
    await until(lambda: late.got == [0, 1, 2, 3, 4])
    first.kill()
    await until(lambda: not late.client.connected, timeout=5)
    await emit(agent, "room-late", 5, start=5)
    await asyncio.sleep(1.6)
    await late.connect(second)
    assert late.state.recovered is False
    assert late.sessions[1][0] != late.sessions[0][0]
    await asyncio.sleep(0.3)
    assert late.got == [0, 1, 2, 3, 4]  # nothing replayed, not even in part
    await late.client.disconnect()
    # away for a moment, but more than the window (maxlen 20) was emitted meanwhile
    far = Listener()
    await far.connect(second, "room-far")
    await emit(agent, "room-far", 3)
    await until(lambda: far.got == [0, 1, 2])
    far.client.eio.ws._response.connection.transport.abort()  # (a dropped network)
    await until(lambda: not far.client.connected, timeout=5)
    watcher = Listener()  # in the room meanwhile: the events are delivered, and trimmed
    await watcher.connect(second, "room-far")
    await emit(agent, "room-far", 50, start=3, interval=0.002)
    # (the last one arrived: the log holds 20, the rest was trimmed, delivered or not; a slow
    # run's delivery may lag the appends and lose some to the trim, which is fine here)
    await until(lambda: watcher.got[-1:] == [52], timeout=10)
    await far.connect(agent)
    assert far.state.recovered is False
    await asyncio.sleep(0.3)
    assert far.got == [0, 1, 2]
    await far.client.disconnect()
    await watcher.client.disconnect()


async def test_a_recovery_refused_for_one_room_costs_no_other_room_its_buffered_events(
    workers: Any,
) -> None:
    # The client's session is in two rooms when its worker is killed. While it is away the
    # agent emits 3 events to "quiet" (nobody else there: they wait in the room's log) and
    # 30 to "busy" (more than the log keeps). It comes back on another worker: "busy" cannot
    # be recovered, so it is a fresh session. The new worker looked at "quiet"'s log to
    # decide; that look must not count as handing anything over: when the fresh session
    # joins "quiet" there, it gets the 3 events that were waiting.
    agent, first, second = workers(3, query="?maxlen=20")
    listener = Listener()
    await listener.connect(first, "quiet")
    assert await listener.client.call("join", "busy") is True
    await emit(agent, "quiet", 1)  # (a client that has an offset in each room asks to
    await emit(agent, "busy", 1, start=99)  # recover)
    await until(lambda: listener.got == [0, 99])
    await asyncio.sleep(0.3)  # (its worker has written the session down)
    first.kill()
    await until(lambda: not listener.client.connected, timeout=5)
    await emit(agent, "quiet", 3, start=1)
    await emit(agent, "busy", 30, start=100)
    await asyncio.sleep(0.3)
    await listener.connect(second)
    assert listener.state.recovered is False  # "busy" is past its log
    assert await listener.client.call("join", "quiet") is True
    await until(lambda: listener.got == [0, 99, 1, 2, 3], timeout=5)
    await listener.client.disconnect()
