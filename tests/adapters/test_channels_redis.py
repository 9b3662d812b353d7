"""The Channels adapter over channels_redis's RedisChannelLayer and a real redis-server."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer
from test_channels import connected, fan_in, guarded_fan_in, received, scenario, tally

import emitguard
from emitguard import ConnectionState
from emitguard_adapters.channels import guard_layer
from redis_support import RedisServer


def redis_layer(server: RedisServer, **options: Any) -> Any:
    return RedisChannelLayer(hosts=[("127.0.0.1", server.port)], **options)


async def test_early_send_two_groups_and_leave_on_redis(redis_server: RedisServer) -> None:
    layer = redis_layer(redis_server)
    guard = guard_layer(layer, stamp_seq="seq")
    early = asyncio.create_task(layer.group_send("a", {"type": "chat.event", "n": 1}))
    await asyncio.sleep(0.05)
    client = await connected(layer, "a", extra="b")
    await early
    assert await received(client, 1) == [{"n": 1, "seq": 1}]
    await client.send_json_to({"leave": "b"})
    assert await received(client, 1) == [{"left": "b"}]
    assert guard.state("b") is ConnectionState.DISCONNECTED
    await layer.group_send("a", {"type": "chat.event", "n": 2})
    assert await received(client, 1) == [{"n": 2, "seq": 2}]
    await client.disconnect()
    assert await guard.drain(1.0) == 0
    emitguard.unguard(layer)
    await layer.flush()


async def burst(layer: Any, count: int) -> list[int]:
    """``count`` group_sends at once to a group of one consumer whose channel holds at most
    ``capacity`` messages; what the client received."""
    client = await connected(layer, "burst")
    await asyncio.gather(
        *(layer.group_send("burst", {"type": "chat.event", "n": n}) for n in range(1, count + 1))
    )
    got: list[int] = []
    while not await client.receive_nothing(0.3):
        got.append((await client.receive_json_from())["n"])
    await client.disconnect()
    return got


async def test_capacity_drops_are_silent_unguarded_and_none_guarded(
    redis_server: RedisServer,
) -> None:
    bare = redis_layer(redis_server, capacity=3)
    got = await burst(bare, 30)
    assert len(got) < 30  # channels_redis dropped the rest for capacity, and said nothing
    await bare.flush()
    layer = redis_layer(redis_server, capacity=3)
    guard = guard_layer(layer, stamp_seq="seq")
    got = await burst(layer, 30)
    assert got == list(range(1, 31))  # the group's line keeps its channel under capacity
    assert await guard.drain(1.0) == 0
    emitguard.unguard(layer)
    await layer.flush()


async def test_a_channel_in_many_groups_over_capacity_is_recorded_and_resent(
    redis_server: RedisServer, records: Any
) -> None:
    """20 groups of one consumer send at once: each group's line keeps to one send at a time,
    but together they fill the channel. channels_redis skips the full channel and only logs;
    guarded, each skipped event is recorded (BUFFERED, reason naming capacity) and re-sent."""
    bare = redis_layer(redis_server, capacity=3)
    got = await fan_in(bare, 20, 3, guarded=False)
    assert sum(map(len, got.values())) < 60  # dropped, and group_send said nothing
    await bare.flush()
    layer = redis_layer(redis_server, capacity=3)
    heard: list[logging.LogRecord] = []
    host = logging.Handler()
    host.emit = heard.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(host)
    try:
        await guarded_fan_in(layer, 20, records)
    finally:
        logging.getLogger().removeHandler(host)
    # The capacity records were read at INFO, but the host's handlers (root at WARNING) got
    # none of them: its logs are what they were without the guard.
    assert logging.getLogger().getEffectiveLevel() > logging.INFO
    assert [r for r in heard if r.name == "channels_redis.core"] == []
    await layer.flush()


async def test_scenario_on_redis_with_sync_agents_in_four_worker_threads(
    redis_server: RedisServer,
) -> None:
    """The issue's second scenario: 30 conversations x 15 events on channels_redis, the agents
    sync code in 4 worker threads calling async_to_sync(layer.group_send), clients joining
    late and every third dropping and reconnecting. (Its time against the unguarded run, 10
    runs: benchmarks/channels_scenario.py.)"""
    bare = redis_layer(redis_server)
    seen, _ = await scenario(bare, guarded=False, sync_workers=4)
    lost, _, _ = tally(seen, 15)
    assert lost > 0  # the late joins and the drops lose events
    await bare.flush()
    layer = redis_layer(redis_server)
    guard = guard_layer(layer, stamp_seq="seq", ready_timeout=3.0)
    seen, _ = await scenario(layer, guarded=True, sync_workers=4)
    assert tally(seen, 15) == (0, 0, 0), (lost, seen)
    assert await guard.drain(2.0) == 0
    assert guard.stats().pending_total == 0
    emitguard.unguard(layer)
    await layer.flush()
