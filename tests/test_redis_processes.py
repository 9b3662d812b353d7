"""Several worker processes on one real Redis: cross-process delivery, a worker killed while it
appends, Redis killed (AOF and no persistence) and paused. Counts scale with
``EMITGUARD_REDIS_SCALE`` (``tests/redis_support.py``)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Records, eventually
from emitguard import Guard, Outcome
from redis_support import SCALE, RedisServer

WORKER = Path(__file__).with_name("redis_worker.py")
WORKERS = 4


class Worker:
    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.read() == "ready"

    def read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the worker died"
        return json.loads(line)

    def ask(self, **command: Any) -> Any:
        self.tell(**command)
        return self.read()

    def tell(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.tell(op="quit")
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def stream_of(server: RedisServer, thread_id: str) -> list[tuple[int, int]]:
    import redis

    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        rows = client.xrange(f"emitguard:{{{thread_id}}}:stream")
    finally:
        client.close()
    return [(int(i.partition("-")[0]), json.loads(f["m"])["n"]) for i, f in rows]


def test_sends_in_random_workers_reach_the_socket_on_another_in_order(
    redis_server: RedisServer,
):
    threads = max(int(100 * SCALE), 4)
    events = max(int(100 * SCALE), 10)
    rng = random.Random(14)
    workers = [Worker(redis_server.url) for _ in range(WORKERS)]
    try:
        home = {f"t{i}": i % WORKERS for i in range(threads)}
        for index, worker in enumerate(workers):
            mine = [t for t, h in home.items() if h == index]
            assert worker.ask(op="connect", threads=mine) == "ok"
        batches: list[list[tuple[str, int]]] = [[] for _ in workers]
        for n in range(events):
            for thread_id, h in home.items():
                other = rng.choice([i for i in range(WORKERS) if i != h])
                batches[other].append((thread_id, n))
        for worker, items in zip(workers, batches, strict=True):
            worker.tell(op="emit", items=items)
        for worker in workers:
            assert worker.read() == "ok"
        deadline = time.monotonic() + 60
        while True:
            reports = [w.ask(op="report")["received"] for w in workers]
            done = sum(len(got) for report in reports for got in report.values())
            if done >= threads * events or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for thread_id, h in home.items():
            got = reports[h].get(thread_id, [])
            assert [seq for seq, _ in got] == list(range(1, events + 1)), thread_id
            assert sorted(n for _, n in got) == list(range(events)), thread_id
            for index, report in enumerate(reports):
                assert index == h or thread_id not in report
    finally:
        for worker in workers:
            worker.stop()


def test_a_worker_killed_while_it_appends_loses_no_acknowledged_event(
    redis_server: RedisServer,
):
    worker = Worker(redis_server.url)
    acked: list[int] = []
    try:
        worker.tell(op="stream", thread="k", count=100_000)
        target = max(int(300 * SCALE), 50)
        while len(acked) < target:
            line = worker.read()
            acked.append(int(line.split()[1]))
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait()
    finally:
        worker.stop()
    stored = stream_of(redis_server, "k")
    numbers = [n for _, n in stored]
    assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
    assert len(numbers) == len(set(numbers))  # no duplicates
    assert set(acked) <= set(numbers)  # every acknowledged event is there
    assert numbers == list(range(len(numbers)))  # in send order


async def test_redis_restarted_from_aof_keeps_every_acknowledged_event(
    redis_server: RedisServer,
):
    guard = Guard(outbox=redis_server.url)
    try:
        count = max(int(200 * SCALE), 20)
        for n in range(count):
            assert await guard.send("t", {"n": n}, deliver=_unused)
        before = await guard.areplay("t", 0)
        redis_server.kill()
        redis_server.start()  # appendfsync always: from the AOF
        after = await guard.areplay("t", 0, before.epoch)
        assert after.complete
        assert (after.epoch, after.latest) == (before.epoch, count)
        assert [m["n"] for _, m in after.messages] == list(range(count))
        redis_server.kill()
        redis_server.start(appendfsync=None)  # no persistence: the history is gone
        lost = await guard.areplay("t", count, before.epoch)
        assert not lost.complete  # an explicit resync, never a silent gap
        assert await guard.send("t", {"n": count}, deliver=_unused)
        fresh = await guard.areplay("t", count, before.epoch)
        assert (fresh.complete, fresh.latest) == (False, 1)
        assert fresh.epoch not in (None, before.epoch)
    finally:
        await guard.aclose()


async def test_redis_paused_sends_wait_and_deliver_in_order(
    redis_server: RedisServer, records: Records
):
    got: list[Any] = []

    async def deliver(thread_id: str, message: Any) -> None:
        got.append((message["seq"], message["n"]))

    guard = Guard(outbox=redis_server.url, deliver=deliver, stamp_seq="seq")
    pause = 5.0 * max(SCALE, 0.2)
    try:
        guard.mark_connected("t")
        await eventually(lambda: guard.stats().backend["delivering"] == 1)
        sent = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        paused = False
        while loop.time() - started < pause + 2.0:
            if not paused and loop.time() - started > 0.5:
                redis_server.pause()
                paused = True
                loop.call_later(pause, redis_server.resume)
            await guard.send("t", {"n": sent}, deliver=_unused)
            sent += 1
            await asyncio.sleep(0.01)
        _kill_pubsub_clients(redis_server)
        for n in range(sent, sent + 5):  # live after the notices' connection was killed
            await guard.send("t", {"n": n}, deliver=_unused)
        sent += 5
        await eventually(lambda: len(got) == sent, 20)
        assert [seq for seq, _ in got] == list(range(1, sent + 1))
        assert [n for _, n in got] == list(range(sent))
        assert not records.of(Outcome.EXPIRED)
        assert guard.stats().backend["redis"] == "up"
    finally:
        await guard.aclose()


def _kill_pubsub_clients(server: RedisServer) -> None:
    import redis

    client = redis.Redis.from_url(server.url)
    try:
        client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    finally:
        client.close()


async def _unused(message: Any) -> None:
    raise AssertionError("not used with a shared outbox")


pytestmark = pytest.mark.filterwarnings("error")
