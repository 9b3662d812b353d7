"""The Redis backend against a real ``redis-server`` (started per test on a free port)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from typing import Any

import pytest

from conftest import Records, eventually
from emitguard import Guard, MemoryOutbox, Outcome
from emitguard.backends import from_url
from emitguard.outbox import OutboxEntry
from emitguard.redis_outbox import RedisOutbox
from redis_support import RedisServer


def backend(server: RedisServer, **knobs: Any) -> RedisOutbox:
    return RedisOutbox(server.url, **knobs)


async def test_append_gives_gap_free_seqs_and_a_retry_adds_nothing(redis_server: RedisServer):
    log = backend(redis_server)
    try:
        first = await log.append("t1", {"type": "a"}, time.time(), "e1")
        second = await log.append("t1", {"type": "b"}, time.time(), "e2")
        again = await log.append("t1", {"type": "a"}, time.time(), "e1")  # a timed-out retry
        other = await log.append("t2", {"type": "x"}, time.time(), "e3")
        assert (first[1], second[1], other[1]) == (1, 2, 1)
        assert again == (first[0], 1, True)
        epoch, rows = await log.read("t1", 0)
        assert epoch == first[0]
        assert [(r.seq, r.message, r.event_type) for r in rows] == [
            (1, {"type": "a"}, "a"),
            (2, {"type": "b"}, "b"),
        ]
        keys = sorted(await log.client.keys("emitguard:{t1}:*"))
        assert "emitguard:{t1}:stream" in keys
        assert "emitguard:{t1}:meta" in keys
        assert await log.client.ttl("emitguard:{t1}:stream") > 0
    finally:
        await log.close()


async def test_lost_history_changes_the_epoch_and_replay_says_resync(redis_server: RedisServer):
    log = backend(redis_server, maxlen=5)
    try:
        for n in range(10):
            epoch, _, _ = await log.append("t", {"n": n}, time.time(), f"e{n}")
        full = await log.replay("t", 6, epoch)
        assert full.complete
        assert [seq for seq, _ in full.messages] == [7, 8, 9, 10]
        assert (full.latest, full.epoch) == (10, epoch)
        assert not (await log.replay("t", 2, epoch)).complete  # fell out of the window
        assert not (await log.replay("t", 11, epoch)).complete  # a seq never given
        assert log.replay_sync("t", 6, epoch) == full
        await log.client.flushall()  # history lost
        assert not (await log.replay("t", 10, epoch)).complete
        new_epoch, seq, _ = await log.append("t", {"n": 0}, time.time(), "f0")
        assert (seq, new_epoch != epoch) == (1, True)
        stale = await log.replay("t", 10, epoch)
        assert (stale.complete, stale.epoch, stale.latest) == (False, new_epoch, 1)
    finally:
        await log.close()


async def test_the_outbox_contract_sees_the_undelivered_part(redis_server: RedisServer):
    log = backend(redis_server)
    try:
        entry = OutboxEntry("t", 0, {"type": "a"}, "a", time.monotonic(), time.time())
        await log.push(entry)
        assert entry.seq == 1
        await log.push(OutboxEntry("t", 0, {"type": "b"}, "b", time.monotonic(), time.time()))
        head = await log.head("t")
        assert head is not None
        assert (head.seq, head.message, head.deliver) == (1, {"type": "a"}, None)
        assert await log.remove("t", 1)
        assert not await log.remove("t", 1)
        assert [e.seq for e in await log.entries("t")] == [2]
        victim = await log.evict_oldest("t", protect=("b",))
        assert victim is None
        assert await log.evict_oldest(None, protect=()) is None
        expired = await log.expire("t", time.monotonic() + 1)
        assert [e.seq for e in expired] == [2]
        assert await log.entries("t") == []
    finally:
        await log.close()


def test_outbox_urls():
    assert isinstance(from_url("memory://"), MemoryOutbox)
    log = from_url("redis://127.0.0.1:1/3?maxlen=7&outage_ttl=2.5&x=1")
    assert isinstance(log, RedisOutbox)
    assert (log.url, log.maxlen, log.outage_ttl) == ("redis://127.0.0.1:1/3?x=1", 7, 2.5)
    with pytest.raises(ValueError, match="no outbox backend"):
        from_url("kafka://x")
    assert "secret" not in repr(from_url("redis://:secret@h:1/0"))


async def test_guard_on_redis_delivers_in_order_and_replays(
    redis_server: RedisServer, records: Records
):
    got: list[Any] = []

    async def deliver(thread_id: str, message: Any) -> None:
        got.append((thread_id, message))

    guard = Guard(outbox=redis_server.url, deliver=deliver, stamp_seq="seq")
    try:
        assert await guard.send("t", {"type": "early"}, deliver=_unused)  # before association
        guard.mark_connected("t")
        for n in range(5):
            assert await guard.send("t", {"type": "m", "n": n}, deliver=_unused)
        await eventually(lambda: len(got) == 6)
        assert [m["seq"] for _, m in got] == [1, 2, 3, 4, 5, 6]
        assert got[0][1]["type"] == "early"
        replay = await guard.areplay("t", 4)
        assert replay.complete
        assert [seq for seq, _ in replay.messages] == [5, 6]
        assert guard.replay("t", 4, epoch="other").complete is False
        assert await guard.drain(1.0) == 0  # (a delivery's record follows the log's mark)
        stats = guard.stats()
        assert stats.backend["redis"] == "up"
        assert stats.outcomes[Outcome.FLUSHED] == 6
        assert stats.outcomes[Outcome.BUFFERED] == 6
        assert await guard.wait_ready("t", 1.0)
        assert not await guard.wait_ready("nobody", 0.1)
        assert [r.seq for r in records.of(Outcome.FLUSHED)] == [1, 2, 3, 4, 5, 6]
        guard.mark_disconnected("t")
        await eventually(lambda: guard.stats().backend["delivering"] == 0)
    finally:
        await guard.aclose()


async def test_a_callable_stamp_is_called_for_log_entries_and_replays(redis_server: RedisServer):
    """stamp_seq may be a callable (for messages that are not dicts): the relay used to put
    the callable itself in the dict as a key."""
    got: list[Any] = []

    async def deliver(thread_id: str, message: Any) -> None:
        got.append(message)

    def stamp(message: Any, seq: int) -> Any:
        return [seq, message]

    guard = Guard(outbox=redis_server.url, deliver=deliver, stamp_seq=stamp)
    try:
        guard.mark_connected("t")
        for n in range(3):
            assert await guard.send("t", {"n": n}, deliver=_unused)
        await eventually(lambda: len(got) == 3)
        assert got == [[1, {"n": 0}], [2, {"n": 1}], [3, {"n": 2}]]
        replay = await guard.areplay("t", 1)
        assert [message for _, message in replay.messages] == [[2, {"n": 1}], [3, {"n": 2}]]
    finally:
        await guard.aclose()


async def test_a_message_redis_cannot_store_is_rejected(redis_server: RedisServer):
    guard = Guard(outbox=redis_server.url)
    try:
        assert not await guard.send("t", {"bad": object()}, deliver=_unused)
        assert guard.stats().outcomes[Outcome.REJECTED] == 1
    finally:
        await guard.aclose()


async def test_without_deliver_the_last_send_of_the_thread_delivers(redis_server: RedisServer):
    got: list[Any] = []

    async def socket_send(message: Any) -> None:
        got.append(message)

    guard = Guard(outbox=redis_server.url)
    try:
        guard.mark_connected("t")
        for n in range(3):
            await guard.send("t", n, socket_send)
        await eventually(lambda: got == [0, 1, 2])
    finally:
        await guard.aclose()


async def _unused(message: Any) -> None:
    raise AssertionError("a guard on redis delivers with its deliver=, not the caller's send")


async def test_redis_down_sends_wait_in_order_then_expire(
    redis_server: RedisServer, records: Records
):
    got: list[Any] = []

    async def deliver(thread_id: str, message: Any) -> None:
        got.append(message)

    url = f"{redis_server.url}?outage_ttl=1.5&timeout=0.3"
    guard = Guard(outbox=url, deliver=deliver)
    try:
        guard.mark_connected("t")
        assert await guard.send("t", 1, _unused)
        await eventually(lambda: got == [1])
        redis_server.kill()
        assert await guard.send("t", 2, _unused)  # accepted locally, no seq
        assert await guard.send("t", 3, _unused)
        stats = guard.stats()
        assert stats.backend["redis"] == "down"
        assert stats.pending == {"t": 2}
        await eventually(lambda: records.of(Outcome.EXPIRED), 5)
        await eventually(lambda: len(records.of(Outcome.EXPIRED)) == 2, 5)
        assert [r.message for r in records.of(Outcome.EXPIRED)] == [2, 3]
        assert guard.stats().backend["local"] == 0
        redis_server.start(appendfsync=None)
        assert await guard.send("t", 4, _unused)
        await eventually(lambda: guard.stats().backend["redis"] == "up", 5)
        await asyncio.sleep(0.1)
        assert 2 not in got
        assert 3 not in got
    finally:
        await guard.aclose()


async def test_threads_associated_while_redis_restarts_use_no_dead_or_orphan_connection(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
):
    # Deliveries that start while Redis is gone used to subscribe on the listener's pub/sub
    # connection themselves: they wrote to a connection Redis had closed (asyncio: "socket.send()
    # raised exception") or reopened one the listener had let go, which nobody closed ("unclosed
    # Connection", a ResourceWarning: an error here). Only the listener touches it now.
    got: list[tuple[str, Any]] = []

    async def deliver(thread_id: str, message: Any) -> None:
        got.append((thread_id, message))

    guard = Guard(outbox=f"{redis_server.url}?timeout=0.3", deliver=deliver)
    try:
        for round_ in range(3):
            for i in range(10):
                guard.mark_connected(f"a{round_}-{i}")
            await asyncio.sleep(0.05)
            redis_server.kill()
            for i in range(10):
                guard.mark_connected(f"b{round_}-{i}")
                guard.mark_disconnected(f"a{round_}-{i}")
            await asyncio.sleep(0.2)
            redis_server.start()
            await asyncio.sleep(0.2)
            gc.collect()
        # threads come and go while Redis kills the notices' connection, again and again
        stop = asyncio.Event()

        async def churn() -> None:
            for i in itertools.count():
                if stop.is_set():
                    return
                guard.mark_connected(f"c{i}")
                if i >= 5:
                    guard.mark_disconnected(f"c{i - 5}")
                await asyncio.sleep(0.002)

        churning = asyncio.create_task(churn())
        for _ in range(10):
            await asyncio.sleep(0.1)
            _kill_pubsub_clients(redis_server)
            gc.collect()
        stop.set()
        await churning
        assert await guard.send("b2-9", {"n": 1}, _unused)
        await eventually(lambda: got == [("b2-9", {"n": 1})])
    finally:
        await guard.aclose()
    gc.collect()
    noisy = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert noisy == []


def _kill_pubsub_clients(server: RedisServer) -> None:
    import redis

    with redis.Redis.from_url(server.url) as client:
        client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


async def test_what_a_resuming_client_got_from_the_replay_is_recorded_once(
    redis_server: RedisServer,
):
    """Events no worker handed over (nobody was connected), which a client then gets from the
    replay on the worker it resumes on, end FLUSHED there, once each, and are not sent again;
    the next event is delivered as usual. Over the two workers, one terminal record each."""
    got: list[Any] = []

    async def deliver(thread_id: str, message: Any) -> None:
        got.append(message["seq"])

    agent = Guard(outbox=redis_server.url, stamp_seq="seq", name="agent-worker")
    socket_worker = Guard(
        outbox=redis_server.url, deliver=deliver, stamp_seq="seq", name="socket-worker"
    )
    try:
        for n in range(3):  # nobody connected anywhere: kept in the log
            assert await agent.send("t", {"n": n}, deliver=_unused)
        async with socket_worker.hold("t"):  # the endpoint of a client resuming from seq 0
            replay = await socket_worker.areplay("t", 0)
            assert [seq for seq, _ in replay.messages] == [1, 2, 3]
            socket_worker.mark_connected("t")
        await eventually(lambda: socket_worker.stats().outcomes[Outcome.FLUSHED] == 3)
        assert await agent.send("t", {"n": 3}, deliver=_unused)
        await eventually(lambda: got == [4])  # the replayed three are not handed over again
        assert await socket_worker.drain(1.0) == 0  # (its record follows the log's mark)
        flushed = [agent.stats().outcomes, socket_worker.stats().outcomes]
        assert sum(outcomes[Outcome.FLUSHED] for outcomes in flushed) == 4
        assert agent.stats().outcomes[Outcome.BUFFERED] == 4
    finally:
        await agent.aclose()
        await socket_worker.aclose()


async def test_what_one_worker_handed_over_is_not_recorded_again_by_another(
    redis_server: RedisServer,
):
    """A worker hands entries 1 and 2 to its socket and is retrying 3 (its socket is dying)
    when the client, which got only 1, resumes on another worker: the first worker's records
    of 1 and 2 and the second's record of what it replayed and nobody had handed over (3)
    make one record per entry; 2 is not recorded twice."""
    got: list[tuple[str, int]] = []

    def deliverer(name: str) -> Any:
        async def deliver(thread_id: str, message: Any) -> bool:
            if name == "first" and message["seq"] == 3:
                return False  # the socket is going: retried with backoff
            got.append((name, message["seq"]))
            return True

        return deliver

    options: dict[str, Any] = {"stamp_seq": "seq", "retry_backoff": (0.5, 0.5)}
    first = Guard(outbox=redis_server.url, deliver=deliverer("first"), name="first", **options)
    second = Guard(outbox=redis_server.url, deliver=deliverer("second"), name="second", **options)
    try:
        first.mark_connected("t")
        for n in range(3):
            assert await first.send("t", {"n": n}, deliver=_unused)
        await eventually(lambda: got == [("first", 1), ("first", 2)])
        await asyncio.sleep(0.1)  # the first worker is retrying seq 3
        async with second.hold("t"):  # the client had seq 1 only
            replay = await second.areplay("t", 1)
            assert [seq for seq, _ in replay.messages] == [2, 3]
            second.mark_connected("t")
        first.mark_disconnected("t")
        assert await first.drain(2.0) == 0
        assert await second.drain(2.0) == 0
        flushed = first.stats().outcomes[Outcome.FLUSHED], second.stats().outcomes[Outcome.FLUSHED]
        assert flushed == (2, 1)  # 1 and 2 by the first worker, 3 by the second: once each
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_replay_read_elsewhere_does_not_move_what_another_worker_delivers(
    redis_server: RedisServer,
):
    """Reading a thread's replay (a worker checking whether a client can recover) is a
    query: another worker that the thread is then associated on still delivers everything
    nobody has delivered, from the log's delivered mark."""
    got: list[int] = []

    async def deliver(thread_id: str, message: Any) -> None:
        got.append(message["seq"])

    agent = Guard(outbox=redis_server.url, stamp_seq="seq", name="agent")
    checker = Guard(outbox=redis_server.url, stamp_seq="seq", name="checker")
    socket_worker = Guard(outbox=redis_server.url, deliver=deliver, stamp_seq="seq", name="b")
    try:
        for n in range(3):  # nobody connected anywhere
            assert await agent.send("t", {"n": n}, deliver=_unused)
        replay = await checker.areplay("t", 0)  # only looked at, never handed to anyone
        assert [seq for seq, _ in replay.messages] == [1, 2, 3]
        socket_worker.mark_connected("t")
        await eventually(lambda: got == [1, 2, 3])
        assert await socket_worker.drain(1.0) == 0
        assert socket_worker.stats().outcomes[Outcome.FLUSHED] == 3
        assert checker.stats().outcomes[Outcome.FLUSHED] == 0
    finally:
        await agent.aclose()
        await checker.aclose()
        await socket_worker.aclose()


async def test_a_peek_at_a_replay_does_not_move_this_workers_next_delivery(
    redis_server: RedisServer,
):
    """A worker that only looked at a thread's replay (``peek=True``: python-socketio's
    recovery checks that every room can be recovered before it hands anything over) still
    delivers everything nobody has delivered when the thread is associated here next; a
    replay handed to a client (the default) is not delivered to it again."""
    got: list[int] = []

    async def deliver(thread_id: str, message: Any) -> None:
        got.append(message["seq"])

    agent = Guard(outbox=redis_server.url, stamp_seq="seq", name="agent")
    worker = Guard(outbox=redis_server.url, deliver=deliver, stamp_seq="seq", name="worker")
    try:
        for n in range(3):  # nobody connected anywhere
            assert await agent.send("t", {"n": n}, deliver=_unused)
        replay = await worker.areplay("t", 0, peek=True)
        assert [seq for seq, _ in replay.messages] == [1, 2, 3]
        worker.mark_connected("t")
        await eventually(lambda: got == [1, 2, 3])
        assert await worker.drain(1.0) == 0
        assert worker.stats().outcomes[Outcome.FLUSHED] == 3

        worker.mark_disconnected("t")
        assert await agent.send("t", {"n": 3}, deliver=_unused)
        handed = await worker.areplay("t", 3)  # handed to a resuming client: not again
        assert [seq for seq, _ in handed.messages] == [4]
        worker.mark_connected("t")
        assert await agent.send("t", {"n": 4}, deliver=_unused)
        await eventually(lambda: got == [1, 2, 3, 5])
    finally:
        await agent.aclose()
        await worker.aclose()
