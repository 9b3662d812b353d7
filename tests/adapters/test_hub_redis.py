"""ThreadHub, SSE and polling on a shared Redis: cursors carry the epoch, a client resumes on
any worker, lost history is an explicit resync. Real redis-server processes on free ports,
real uvicorn workers (processes, and servers in the test's loop), real websockets clients."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conftest import Records, eventually
from emitguard import Outcome
from emitguard_adapters.fallback import emitguard_routes
from emitguard_adapters.starlette import ThreadHub, allow_any
from emitguard_adapters.testing import serve
from redis_support import SCALE, AppWorker, RedisServer

HUB = Path(__file__).parent.parent / "redis_hub_worker.py"


class Reader:
    """A websocket client of one thread that keeps its cursor (epoch, last seq)."""

    def __init__(self, thread_id: str) -> None:
        self.thread_id = thread_id
        self.got: list[dict[str, Any]] = []
        self.resyncs: list[dict[str, Any]] = []
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.connections = 0

    async def read(self, url: str, until: int, *, kill_after: int | None = None) -> None:
        """Read from ``url`` until ``until`` events arrived (or, with ``kill_after``, until
        that many did: the caller kills the server); the connection may drop meanwhile."""
        self.connections += 1
        async with connect(url) as socket:
            await socket.send(json.dumps(self.hello()))
            with contextlib_suppress_closed():
                while len(self.got) < (kill_after or until):
                    self.take(json.loads(await asyncio.wait_for(socket.recv(), 10)))

    def hello(self) -> dict[str, Any]:
        return {"thread_id": self.thread_id, "last_seq": self.last_seq, "epoch": self.epoch}

    def take(self, message: dict[str, Any]) -> None:
        if message["type"] == "resync":
            self.resyncs.append(message)
            self.epoch, self.last_seq = message.get("epoch"), message["latest_seq"]
            return
        self.got.append(message)
        self.epoch, self.last_seq = message["epoch"], message["seq"]


class contextlib_suppress_closed:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, ConnectionClosed)


@pytest.fixture
def workers(redis_server: RedisServer) -> Any:
    started: list[AppWorker] = []

    def start(count: int) -> list[AppWorker]:
        started.extend(AppWorker(HUB, redis_server.url) for _ in range(count))
        return started[-count:]

    yield start
    for worker in started:
        worker.stop()


async def test_a_client_whose_worker_is_killed_resumes_on_another_with_every_event_once(
    workers: Any,
) -> None:
    # An agent emits in worker A; each thread's client reads on worker B; B is killed -9
    # mid-run; the clients reconnect to C with their cursor and get the rest, in order, once.
    agent, first, second = workers(3)
    count = max(int(300 * SCALE), 60)
    threads = [f"t{i}" for i in range(3)]
    readers = {thread_id: Reader(thread_id) for thread_id in threads}
    reading = [
        asyncio.create_task(reader.read(first.ws, count, kill_after=count // 3))
        for reader in readers.values()
    ]
    await asyncio.sleep(0.3)  # the readers are attached on B (the log would keep it anyway)
    async with httpx.AsyncClient(base_url=agent.http) as http:
        for thread_id in threads:
            order = {"thread": thread_id, "count": count, "interval": 0.005}
            assert (await http.post("/emit", json=order)).status_code == 200
        await asyncio.wait_for(asyncio.gather(*reading), 20)
        first.kill()  # mid-run: the agent is still emitting in A
        assert all(len(r.got) < count for r in readers.values())
        await asyncio.wait_for(
            asyncio.gather(*(r.read(second.ws, count) for r in readers.values())), 30
        )
        await asyncio.sleep(0.3)  # anything delivered twice would arrive now
        emitted = (await http.get("/emitted")).json()
        # the cursor a client held when B died resumes on C with recovered: true (polling)
        resumed = readers[threads[0]]
        epoch, after = resumed.got[0]["epoch"], count // 3
        async with httpx.AsyncClient(base_url=second.http) as poll:
            page = (await poll.get(f"/emitguard/threads/t0/messages?after={epoch}:{after}")).json()
        assert (page["type"], page["recovered"], page["epoch"]) == ("page", True, epoch)
        seqs = [m["seq"] for m in page["messages"]]  # a page (of at most 100), from after + 1
        assert seqs == list(range(after + 1, min(after + 100, count) + 1))
    for thread_id, reader in readers.items():
        assert emitted[thread_id] == count  # every send was acknowledged by the log
        assert reader.resyncs == []
        assert reader.connections == 2
        assert [m["seq"] for m in reader.got] == list(range(1, count + 1)), thread_id
        assert [m["n"] for m in reader.got] == list(range(count)), thread_id
        assert len({m["epoch"] for m in reader.got}) == 1


async def test_sends_in_random_workers_reach_each_client_on_another_once_in_order(
    workers: Any,
) -> None:
    # 4 worker processes; 100 threads, each with a websocket client on worker i % 4; each of
    # its 100 events is emitted in a random other worker. Every client gets seq 1..100 once,
    # in order, each event once, and each sender's events in the order it sent them.
    pool = workers(4)
    threads = max(int(100 * SCALE), 8)
    events = max(int(100 * SCALE), 10)
    rng = random.Random(14)
    home = {f"t{i}": i % len(pool) for i in range(threads)}
    readers = {thread_id: Reader(thread_id) for thread_id in home}
    sockets = {t: await connect(pool[h].ws) for t, h in home.items()}
    try:
        for thread_id, socket in sockets.items():
            await socket.send(json.dumps(readers[thread_id].hello()))
        await asyncio.sleep(0.5)  # attached (the log would keep what comes before anyway)
        batches: list[list[tuple[str, int]]] = [[] for _ in pool]
        sender: dict[tuple[str, int], int] = {}
        for n in range(events):
            for thread_id, h in home.items():
                other = rng.choice([i for i in range(len(pool)) if i != h])
                batches[other].append((thread_id, n))
                sender[thread_id, n] = other

        async def read(thread_id: str) -> None:
            reader, socket = readers[thread_id], sockets[thread_id]
            while len(reader.got) < events:
                reader.take(json.loads(await asyncio.wait_for(socket.recv(), 30)))
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                reader.take(json.loads(await asyncio.wait_for(socket.recv(), 0.3)))

        reading = asyncio.gather(*(read(t) for t in home))
        async with httpx.AsyncClient(timeout=120) as http:
            answers = await asyncio.gather(
                *(
                    http.post(f"{worker.http}/emit-items", json={"items": items})
                    for worker, items in zip(pool, batches, strict=True)
                )
            )
        assert sum(answer.json()["acked"] for answer in answers) == threads * events
        await asyncio.wait_for(reading, 120)
    finally:
        for socket in sockets.values():
            await socket.close()
    for thread_id, reader in readers.items():
        assert reader.resyncs == []
        assert [m["seq"] for m in reader.got] == list(range(1, events + 1)), thread_id
        assert sorted(m["n"] for m in reader.got) == list(range(events)), thread_id
        for index in range(len(pool)):
            mine = [m["n"] for m in reader.got if sender[thread_id, m["n"]] == index]
            assert mine == sorted(mine), (thread_id, index)


# ------------------------------------------------------- in one process, two hubs on Redis


async def _hub_server(url: str) -> tuple[ThreadHub, Starlette]:
    hub = ThreadHub(authorize=allow_any, outbox=url)

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await hub.serve(websocket)

    routes = [WebSocketRoute("/ws", endpoint), *emitguard_routes(hub.guard, authorize=allow_any)]
    return hub, Starlette(routes=routes)


async def _recv(socket: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), 5))
    return message


async def test_lost_history_is_a_resync_in_the_new_epoch(redis_server: RedisServer) -> None:
    hub_a, app_a = await _hub_server(redis_server.url)
    hub_b, app_b = await _hub_server(redis_server.url)
    try:
        async with serve(app_a) as base_a, serve(app_b) as base_b:
            async with connect(f"ws://{base_b}/ws") as socket:
                await socket.send(json.dumps({"thread_id": "t1", "last_seq": None}))
                await asyncio.sleep(0.2)
                for n in range(3):
                    assert await hub_a.send("t1", {"type": "agent_update", "n": n})
                got = [await _recv(socket) for _ in range(3)]
            assert [m["seq"] for m in got] == [1, 2, 3]
            epoch = got[0]["epoch"]
            assert epoch
            assert {m["epoch"] for m in got} == {epoch}

            # the same cursor on the other worker: nothing missed, then live
            async with connect(f"ws://{base_a}/ws") as socket:
                hello = {"thread_id": "t1", "last_seq": 1, "epoch": epoch}
                await socket.send(json.dumps(hello))
                assert [(await _recv(socket))["seq"] for _ in range(2)] == [2, 3]
                assert await hub_b.send("t1", {"type": "agent_update", "n": 3})
                assert (await _recv(socket))["seq"] == 4

            # the thread's history is lost (Redis killed and restarted with no persistence):
            # the next send makes a new epoch
            redis_server.kill()
            redis_server.start(appendfsync=None)
            assert await hub_a.send("t1", {"type": "agent_update", "n": 4})
            async with connect(f"ws://{base_b}/ws") as socket:
                hello = {"thread_id": "t1", "last_seq": 4, "epoch": epoch}
                await socket.send(json.dumps(hello))
                resync = await _recv(socket)
            assert resync["type"] == "resync"
            assert resync["recovered"] is False
            assert resync["epoch"] != epoch
            assert resync["latest_seq"] == 1

            # SSE and polling hand out and take the same (epoch, seq) cursors
            async with httpx.AsyncClient(base_url=f"http://{base_a}", timeout=5) as http:
                page = (await http.get("/emitguard/threads/t1/messages?after=0")).json()
                assert page["epoch"] == resync["epoch"]
                assert page["cursor"] == f"{resync['epoch']}:1"
                assert [m["seq"] for m in page["messages"]] == [1]
                stale = f"{epoch}:1"
                page = (await http.get(f"/emitguard/threads/t1/messages?after={stale}")).json()
                assert page["type"] == "resync"
                assert page["epoch"] == resync["epoch"]
                headers = {"Last-Event-ID": stale}
                async with http.stream("GET", "/emitguard/threads/t1/events", headers=headers) as r:
                    assert await _first_event(r) == ("resync", None)
                headers = {"Last-Event-ID": f"{resync['epoch']}:0"}
                async with http.stream("GET", "/emitguard/threads/t1/events", headers=headers) as r:
                    assert await _first_event(r) == ("agent_update", f"{resync['epoch']}:1")
    finally:
        await hub_a.guard.aclose()
        await hub_b.guard.aclose()


async def _first_event(response: httpx.Response) -> tuple[str, str | None]:
    fields: dict[str, str] = {}
    lines = response.aiter_lines()
    while True:
        line = await asyncio.wait_for(anext(lines), 5)
        if line == "" and "data" in fields:
            return fields["event"], fields.get("id")
        if line and not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.strip()


# ------------------------------------------- Redis itself killed and restarted, end to end


class _Live:
    """One websocket client of a thread that reads until cancelled: the first connection to
    ``bases[0]``, each one after the server closed it to the next of ``bases`` (the last one
    again and again), resuming with its cursor."""

    def __init__(self, thread_id: str) -> None:
        self.reader = Reader(thread_id)
        self.closed = 0
        self.reasons: list[str] = []

    async def run(self, *bases: str) -> None:
        for attempt in itertools.count():
            base = bases[min(attempt, len(bases) - 1)]
            with contextlib_suppress_closed():
                async with connect(f"ws://{base}/ws") as socket:
                    await socket.send(json.dumps(self.reader.hello()))
                    async for raw in socket:
                        self.reader.take(json.loads(raw))
            self.closed += 1
            self.reasons.append(f"{socket.close_code} {socket.close_reason}")
            await asyncio.sleep(0.05)


async def test_redis_killed_and_restarted_end_to_end(redis_server: RedisServer) -> None:
    # The agent emits in hub A, the client reads on hub B. Redis is killed -9 mid-run and
    # restarted from its AOF (appendfsync always): every acknowledged event reaches the client
    # once, in order, in the same epoch, on the same socket. Then Redis is killed and
    # restarted with no persistence: the next send makes a new epoch, B closes the socket (a
    # delivery of another epoch), and the client, resuming on A with its old cursor, is told
    # to resync, then reads on: never a silent gap.
    hub_a, app_a = await _hub_server(redis_server.url)
    hub_b, app_b = await _hub_server(redis_server.url)
    count = max(int(60 * SCALE), 20)
    client = _Live("t1")
    got = client.reader.got
    acked: list[int] = []

    async def agent(numbers: range) -> None:
        for n in numbers:
            if await hub_a.send("t1", {"type": "agent_update", "n": n}):
                acked.append(n)
            await asyncio.sleep(0.01)

    reading: asyncio.Task[None] | None = None
    try:
        async with serve(app_a) as base_a, serve(app_b) as base_b:
            reading = asyncio.create_task(client.run(base_b, base_a))
            await eventually(lambda: hub_b.connections("t1") == 1)
            emitting = asyncio.create_task(agent(range(count)))
            await eventually(lambda: len(got) >= count // 3)
            redis_server.kill()
            await asyncio.sleep(0.5)  # sends meanwhile wait in A's local buffer, in order
            redis_server.start()  # from the AOF
            await asyncio.wait_for(emitting, 30)
            await eventually(lambda: len(got) >= count, 30)
            await asyncio.sleep(0.3)  # anything delivered twice would arrive now
            assert acked == list(range(count))
            assert [m["seq"] for m in got] == list(range(1, count + 1))
            assert [m["n"] for m in got] == list(range(count))
            assert len({m["epoch"] for m in got}) == 1
            assert (client.reader.resyncs, client.closed) == ([], 0)
            epoch = got[0]["epoch"]

            redis_server.kill()
            redis_server.start(appendfsync=None)  # the logs are gone: a new epoch
            await agent(range(count, count + 3))
            await eventually(lambda: client.reader.resyncs != [], 10)
            resync = client.reader.resyncs[0]
            assert (resync["type"], resync["recovered"]) == ("resync", False)
            assert resync["last_seq"] == count
            assert resync["epoch"] not in (None, epoch)
            assert client.closed == 1  # B closed the socket that met the new epoch
            await agent(range(count + 3, count + 5))
            await eventually(lambda: got[-1]["n"] == count + 4, 10)
            await asyncio.sleep(0.3)
            after, latest = got[count:], resync["latest_seq"]
            assert {m["epoch"] for m in after} == {resync["epoch"]}
            assert [m["seq"] for m in after] == list(range(latest + 1, 6))
            assert [m["n"] for m in after] == list(range(count + latest, count + 5))
            assert (len(client.reader.resyncs), client.closed) == (1, 1)
    finally:
        if reading is not None:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        await hub_a.guard.aclose()
        await hub_b.guard.aclose()


async def test_a_client_away_longer_than_the_window_is_told_to_resync(
    redis_server: RedisServer,
) -> None:
    # The window is the thread's stream (maxlen 5 here). A client that saw seq 2 and comes back
    # after 10 more events, on another worker, gets recovered: false and a resync (websocket
    # and polling), then reads on live; one away for less than the window gets the rest.
    url = f"{redis_server.url}?maxlen=5"
    hub_a, app_a = await _hub_server(url)
    hub_b, app_b = await _hub_server(url)
    try:
        async with serve(app_a) as base_a, serve(app_b) as base_b:
            async with connect(f"ws://{base_b}/ws") as socket:
                await socket.send(json.dumps({"thread_id": "w", "last_seq": None}))
                await eventually(lambda: hub_b.connections("w") == 1)
                for n in range(2):
                    assert await hub_a.send("w", {"type": "agent_update", "n": n})
                seen = [await _recv(socket) for _ in range(2)]
            epoch = seen[-1]["epoch"]
            for n in range(2, 12):  # the client is away: seq 3..12, the window keeps 8..12
                assert await hub_a.send("w", {"type": "agent_update", "n": n})
            async with connect(f"ws://{base_a}/ws") as socket:
                await socket.send(json.dumps({"thread_id": "w", "last_seq": 2, "epoch": epoch}))
                resync = await _recv(socket)
                assert resync == {
                    "type": "resync",
                    "thread_id": "w",
                    "last_seq": 2,
                    "latest_seq": 12,
                    "recovered": False,
                    "epoch": epoch,  # the same epoch: the window, not the history, ran out
                }
                await eventually(lambda: hub_a.connections("w") == 1)
                assert await hub_b.send("w", {"type": "agent_update", "n": 12})
                live = await _recv(socket)
                assert (live["seq"], live["n"], live["epoch"]) == (13, 12, epoch)
            async with httpx.AsyncClient(base_url=f"http://{base_b}", timeout=5) as http:
                page = (await http.get(f"/emitguard/threads/w/messages?after={epoch}:2")).json()
                told = (page["type"], page["recovered"], page["latest_seq"])
                assert told == ("resync", False, 13)
                page = (await http.get(f"/emitguard/threads/w/messages?after={epoch}:8")).json()
                assert (page["type"], page["recovered"]) == ("page", True)
                assert [m["seq"] for m in page["messages"]] == [9, 10, 11, 12, 13]
    finally:
        await hub_a.guard.aclose()
        await hub_b.guard.aclose()


async def test_redis_paused_and_notices_killed_end_to_end(
    redis_server: RedisServer, records: Records
) -> None:
    # Agents emit in hub A to three threads whose clients read on hub B. Redis is paused
    # (SIGSTOP) for 5 s mid-run: the sends wait in A's local buffer, in order, and go into the
    # log when it resumes; then Redis kills every pub/sub connection (B's notices): the
    # clients catch up. Every event reaches its client once, in order; nothing is recorded
    # lost (no EXPIRED, DROPPED or FAILED).
    hub_a, app_a = await _hub_server(redis_server.url)
    hub_b, app_b = await _hub_server(redis_server.url)
    pause = 5.0 * max(SCALE, 0.2)
    clients = {f"p{i}": _Live(f"p{i}") for i in range(3)}
    emitted: dict[str, int] = dict.fromkeys(clients, 0)
    stop = asyncio.Event()

    async def agent(thread_id: str) -> None:
        while not stop.is_set():
            message = {"type": "agent_update", "n": emitted[thread_id]}
            assert await hub_a.send(thread_id, message)
            emitted[thread_id] += 1
            await asyncio.sleep(0.02)

    reading: list[asyncio.Task[None]] = []
    try:
        async with serve(app_a) as base_a, serve(app_b) as base_b:
            reading = [asyncio.create_task(c.run(base_b, base_a)) for c in clients.values()]
            await eventually(lambda: all(hub_b.connections(t) == 1 for t in clients))
            agents = [asyncio.create_task(agent(t)) for t in clients]
            await asyncio.sleep(0.5)
            redis_server.pause()
            await asyncio.sleep(pause)
            redis_server.resume()
            await asyncio.sleep(0.5)
            with redis.Redis.from_url(redis_server.url) as client:
                assert client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
            await asyncio.sleep(0.5)  # live after the notices' connection was killed
            stop.set()
            await asyncio.gather(*agents)

            def caught_up() -> bool:
                return all(len(c.reader.got) >= emitted[t] for t, c in clients.items())

            await eventually(caught_up, 20)
            await asyncio.sleep(0.3)  # anything delivered twice would arrive now
            for client in clients.values():  # (before the servers stop: that closes them)
                assert (client.reader.resyncs, client.closed) == ([], 0), client.reasons
        for thread_id, client in clients.items():
            got = client.reader.got
            assert [m["seq"] for m in got] == list(range(1, emitted[thread_id] + 1)), thread_id
            assert [m["n"] for m in got] == list(range(emitted[thread_id])), thread_id
        assert min(emitted.values()) >= 20
        lost = (Outcome.EXPIRED, Outcome.DROPPED, Outcome.FAILED)
        assert [r for r in records.items if r.outcome in lost] == []
        paused = [r for r in records.of(Outcome.BUFFERED) if r.seq == 0]
        assert paused  # some sends waited locally (no seq) while Redis was paused
    finally:
        for task in reading:
            task.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        await hub_a.guard.aclose()
        await hub_b.guard.aclose()
