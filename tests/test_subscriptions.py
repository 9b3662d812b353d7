"""Subscriptions: a fallback transport's readers count as connections of their thread."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import Sink, settle
from emitguard import ConnectionState, Guard, Outcome


async def no_socket(message: Any) -> bool:
    """The manager's own send when the thread's only reader is a subscription."""
    return False


async def take(subscription: Any, count: int) -> list[tuple[int, Any]]:
    got = []
    async for item in subscription:
        got.append(item)
        if len(got) == count:
            break
    return got


async def test_a_subscription_connects_the_thread_and_gets_every_delivery() -> None:
    guard = Guard(stamp_seq="seq")
    assert guard.state("t1") is ConnectionState.CONNECTING
    subscription = guard.subscribe("t1")
    assert guard.state("t1") is ConnectionState.CONNECTED
    for n in range(3):
        assert await guard.send("t1", {"type": "agent_update", "n": n}, no_socket)
    assert await take(subscription, 3) == [
        (1, {"type": "agent_update", "n": 0, "seq": 1}),
        (2, {"type": "agent_update", "n": 1, "seq": 2}),
        (3, {"type": "agent_update", "n": 2, "seq": 3}),
    ]
    stats = guard.stats()
    assert stats.outcomes[Outcome.DELIVERED] == 3
    assert stats.outcomes[Outcome.BUFFERED] == 0


async def test_the_outbox_flushes_to_a_new_subscription(sink: Sink) -> None:
    guard = Guard(on_unready="buffer")
    assert await guard.send("t1", {"type": "a"}, no_socket)
    assert await guard.send("t1", {"type": "b"}, no_socket)
    assert guard.stats().pending == {"t1": 2}
    subscription = guard.subscribe("t1")
    assert await take(subscription, 2) == [(1, {"type": "a"}), (2, {"type": "b"})]
    assert await guard.drain(1.0) == 0
    assert guard.stats().outcomes[Outcome.FLUSHED] == 2


async def test_the_manager_and_the_subscription_both_get_it(sink: Sink) -> None:
    guard = Guard()
    guard.mark_connected("t1")
    subscription = guard.subscribe("t1")
    assert await guard.send("t1", {"type": "a"}, sink.for_thread("t1"))
    assert sink.types("t1") == ["a"]
    assert await take(subscription, 1) == [(1, {"type": "a"})]


async def test_a_transport_error_still_counts_when_a_subscription_took_it(sink: Sink) -> None:
    guard = Guard()
    subscription = guard.subscribe("t1")
    sink.raise_on.add("t1")
    assert await guard.send("t1", {"type": "a"}, sink.for_thread("t1"))
    assert await take(subscription, 1) == [(1, {"type": "a"})]
    assert guard.stats().outcomes[Outcome.DELIVERED] == 1


async def test_a_poison_message_is_not_fanned_out() -> None:
    async def poison(message: Any) -> bool:
        raise TypeError("cannot serialise")

    guard = Guard()
    subscription = guard.subscribe("t1")
    assert await guard.send("t1", {"type": "a"}, poison) is False
    subscription.close()
    assert [item async for item in subscription] == []
    assert guard.stats().outcomes[Outcome.FAILED] == 1


async def test_closing_the_last_carrier_disconnects_the_thread() -> None:
    guard = Guard(on_unready="buffer")
    first, second = guard.subscribe("t1"), guard.subscribe("t1")
    first.close("client went away")
    assert guard.state("t1") is ConnectionState.CONNECTED
    second.close("client went away")
    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert await guard.send("t1", {"type": "late"}, no_socket)
    assert guard.stats().pending == {"t1": 1}
    assert first.reason == "client went away"


async def test_a_reader_that_falls_behind_is_closed_not_buffered_forever() -> None:
    guard = Guard()
    slow = guard.subscribe("t1", maxsize=2)
    keeping_up = guard.subscribe("t1")
    for n in range(3):
        assert await guard.send("t1", {"n": n}, no_socket)
    assert slow.closed
    assert slow.reason == "fell 2 messages behind"
    assert [seq for seq, _ in [item async for item in slow]] == [1, 2]
    assert [seq for seq, _ in await take(keeping_up, 3)] == [1, 2, 3]


async def test_end_subscriptions_ends_every_reader_of_the_thread() -> None:
    guard = Guard()
    readers = [guard.subscribe("t1") for _ in range(3)]
    other = guard.subscribe("t2")
    waiting = asyncio.create_task(take(readers[0], 1))
    await settle()
    assert guard.end_subscriptions("t1", "deploy") == 3
    assert await waiting == []
    assert all(reader.reason == "deploy" for reader in readers)
    assert not other.closed
    assert guard.end_subscriptions("unknown") == 0


async def test_with_no_subscription_left_the_hot_path_comes_back(sink: Sink) -> None:
    guard = Guard()
    guard.mark_connected("t1")
    assert guard._pipeline.fast is guard._table.slots
    subscription = guard.subscribe("t1")
    assert guard._pipeline.fast == {}
    subscription.close()
    assert guard._pipeline.fast is guard._table.slots


def test_bad_subscriptions_are_refused() -> None:
    guard = Guard()
    with pytest.raises(ValueError, match="thread_id must be a hashable id"):
        guard.subscribe("")
    with pytest.raises(ValueError, match="maxsize must be an int >= 1, got 0"):
        guard.subscribe("t1", maxsize=0)
