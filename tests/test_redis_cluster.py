"""The Redis backend on a real 3-node Redis Cluster (started by the test on free ports):
redis-py's ``RedisCluster`` client (``?cluster=1``), every key of a thread in its slot, the
append script on the slot's node, notices by classic pub/sub across nodes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from conftest import eventually
from emitguard import Guard
from emitguard._relay import Relay
from emitguard.redis_outbox import RedisOutbox, from_url
from redis_support import RedisCluster


async def test_the_log_lives_in_each_thread_s_slot(redis_cluster: RedisCluster) -> None:
    log = from_url(f"{redis_cluster.url}?cluster=1")
    assert log.cluster
    try:
        threads = [f"t{i}" for i in range(12)]
        for thread_id in threads:
            first = await log.append(thread_id, {"n": 0}, time.time(), f"{thread_id}-e0")
            again = await log.append(thread_id, {"n": 0}, time.time(), f"{thread_id}-e0")
            assert (first[1], again) == (1, (first[0], 1, True))  # a retry adds nothing
            await log.append(thread_id, {"n": 1}, time.time(), f"{thread_id}-e1")
        client = log.client
        nodes = set()
        for thread_id in threads:
            slots = {client.keyslot(log.key(thread_id, part)) for part in ("stream", "meta")}
            assert len(slots) == 1
            nodes.add(client.get_node_from_key(log.key(thread_id, "meta")).name)
            epoch, rows = await log.read(thread_id, 0)
            assert [(r.seq, r.message) for r in rows] == [(1, {"n": 0}), (2, {"n": 1})]
            replay = await log.replay(thread_id, 1, epoch)
            assert (replay.complete, replay.messages, replay.latest) == (True, [(2, {"n": 1})], 2)
            assert log.replay_sync(thread_id, 1, epoch) == replay  # the blocking cluster client
        assert len(nodes) == 3  # the threads are spread over every node
    finally:
        await log.close()


async def test_a_send_in_one_guard_reaches_another_in_order_across_nodes(
    redis_cluster: RedisCluster,
) -> None:
    got: dict[str, list[tuple[int, int]]] = {}

    async def deliver(thread_id: str, message: Any) -> None:
        got.setdefault(thread_id, []).append((message["seq"], message["n"]))

    url = f"{redis_cluster.url}?cluster=1"
    sender = Guard(outbox=url, deliver=_unused, stamp_seq="seq")
    receiver = Guard(outbox=url, deliver=deliver, stamp_seq="seq")
    threads = [f"c{i}" for i in range(9)]
    try:
        for thread_id in threads:
            receiver.mark_connected(thread_id)
        for thread_id in threads:  # the readiness barrier is global: held in the receiver
            assert await sender.wait_ready(thread_id, 5)
        for n in range(20):
            for thread_id in threads:
                assert await sender.send(thread_id, {"n": n}, _unused)
        await eventually(lambda: sum(map(len, got.values())) == 20 * len(threads), 10)
        for thread_id in threads:
            assert got[thread_id] == [(n + 1, n) for n in range(20)], thread_id
        # notices (published on the thread's node, read on the node the receiver listens
        # to), not the 1 s poll, wake the receiver: one send after another each arrives well
        # within a poll (by polling alone the second would wait about a second)
        for n in range(20, 25):
            started = time.monotonic()
            assert await sender.send("c0", {"n": n}, _unused)
            await eventually(lambda n=n: len(got["c0"]) == n + 1, 5)
            assert time.monotonic() - started < Relay.poll / 3
    finally:
        await sender.aclose()
        await receiver.aclose()


async def test_lost_history_on_a_cluster_is_a_new_epoch(redis_cluster: RedisCluster) -> None:
    log = RedisOutbox(redis_cluster.url, cluster=True)
    try:
        epoch, _, _ = await log.append("t", {"n": 0}, time.time(), "e0")
        await log.client.flushall(target_nodes=log.client.ALL_NODES)  # every node's data lost
        new_epoch, seq, _ = await log.append("t", {"n": 1}, time.time(), "e1")
        assert (seq, new_epoch != epoch) == (1, True)
        stale = await log.replay("t", 1, epoch)
        assert (stale.complete, stale.epoch, stale.latest) == (False, new_epoch, 1)
    finally:
        await log.close()


async def _unused(message: Any) -> None:
    raise AssertionError("a guard on redis delivers with its deliver=, not the caller's send")


pytestmark = pytest.mark.filterwarnings("error")
