"""Outbox bounds (overflow policies, protect, global cap), TTL expiry and the memory backend."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from conftest import Records, Sink
from emitguard import Guard, MemoryOutbox, OutboxEntry, Outcome
from emitguard.outbox import drive


async def fill(guard: Guard, sink: Sink, thread: str, kinds: list[str]) -> list[bool]:
    return [
        await guard.send(thread, {"type": kind, "i": i}, sink.for_thread(thread))
        for i, kind in enumerate(kinds)
    ]


async def test_drop_oldest_evicts_and_reports_the_victim(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", max_per_thread=2)
    records.guard = guard
    assert await fill(guard, sink, "t", ["a", "b", "c"]) == [True, True, True]
    [dropped] = records.of(Outcome.DROPPED)
    assert dropped.seq == 1
    assert (
        dropped.reason == "outbox full, max_per_thread=2, evicted for a newer event (drop_oldest)"
    )
    guard.mark_connected("t")
    await guard.drain(1.0)
    assert sink.types("t") == ["b", "c"]


async def test_drop_newest_drops_the_new_event(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", max_per_thread=2, overflow="drop_newest")
    records.guard = guard
    assert await fill(guard, sink, "t", ["a", "b", "c"]) == [True, True, False]
    [dropped] = records.of(Outcome.DROPPED)
    assert (dropped.seq, dropped.reason) == (
        3,
        "outbox full, max_per_thread=2, overflow=drop_newest",
    )


async def test_reject_policy(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", max_per_thread=1, overflow="reject")
    records.guard = guard
    assert await fill(guard, sink, "t", ["a", "b"]) == [True, False]
    assert records.of(Outcome.REJECTED)[0].reason == "outbox full, max_per_thread=1"


async def test_protected_events_are_never_evicted(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", max_per_thread=2, protect={"agent_completed"})
    records.guard = guard
    await fill(guard, sink, "t", ["agent_completed", "x", "y"])
    assert [r.event_type for r in records.of(Outcome.DROPPED)] == ["x"]
    guard.mark_connected("t")
    await guard.drain(1.0)
    assert sink.types("t") == ["agent_completed", "y"]


async def test_protected_new_event_displaces_unprotected_under_drop_newest(
    sink: Sink, records: Records
) -> None:
    guard = Guard(
        on_unready="buffer", max_per_thread=2, overflow="drop_newest", protect={"agent_completed"}
    )
    records.guard = guard
    assert await fill(guard, sink, "t", ["x", "y", "agent_completed"]) == [True, True, True]
    assert [r.event_type for r in records.of(Outcome.DROPPED)] == ["x"]


async def test_all_protected_means_the_new_event_is_dropped(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", max_per_thread=1, protect={"p"})
    records.guard = guard
    assert await fill(guard, sink, "t", ["p", "p"]) == [True, False]
    assert "every buffered event is protected" in (records.of(Outcome.DROPPED)[0].reason or "")


async def test_global_cap_evicts_the_oldest_of_any_thread(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", max_total=2)
    records.guard = guard
    await fill(guard, sink, "a", ["a1"])
    await fill(guard, sink, "b", ["b1"])
    await fill(guard, sink, "c", ["c1"])
    [dropped] = records.of(Outcome.DROPPED)
    assert (dropped.thread_id, dropped.event_type) == ("a", "a1")
    assert "max_total=2" in (dropped.reason or "")
    assert guard.stats().pending == {"b": 1, "c": 1}


async def test_ttl_expires_without_any_send_on_the_thread(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", ttl=0.05)
    records.guard = guard
    await fill(guard, sink, "gone", ["a", "b"])
    await asyncio.sleep(0.15)  # the sweeper runs; the thread never comes back
    expired = records.of(Outcome.EXPIRED)
    assert [r.seq for r in expired] == [1, 2]
    assert expired[0].reason == "expired after ttl=0.05s in the outbox"
    assert guard.stats().pending_total == 0
    assert guard.stats().outcomes[Outcome.EXPIRED] == 2
    await guard.aclose()


def test_ttl_expiry_seen_by_stats_without_a_loop(sink: Sink) -> None:
    guard = Guard(ttl=0.01)
    guard.send_sync("t", {"type": "a"}, lambda m: sink.deliver_now("t", m))
    assert guard.stats().pending == {"t": 1}
    time.sleep(0.03)
    stats = guard.stats()
    assert stats.pending == {}
    assert stats.outcomes[Outcome.EXPIRED] == 1


async def test_drain_expires_before_flushing(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", ttl=0.02)
    records.guard = guard
    await fill(guard, sink, "t", ["old"])
    await asyncio.sleep(0.03)
    guard.mark_connected("t")
    assert await guard.drain(1.0) == 0
    assert sink.received == {}
    assert records.outcomes()[-1] is Outcome.EXPIRED
    await guard.aclose()


def _entry(thread: str, seq: int, kind: str = "x", created: float = 0.0) -> OutboxEntry:
    return OutboxEntry(thread, seq, {"type": kind}, kind, created, 0.0)


async def test_memory_outbox_keeps_seq_order() -> None:
    box = MemoryOutbox()
    for seq in (1, 3, 2):
        await box.push(_entry("t", seq))
    assert [e.seq for e in await box.entries("t")] == [1, 2, 3]
    assert (await box.head("t")).seq == 1  # type: ignore[union-attr]
    assert await box.remove("t", 2) is True
    assert await box.remove("t", 2) is False
    assert await box.remove("nope", 1) is False
    assert await box.remove("t", 99) is False
    assert await box.head("nope") is None


async def test_memory_outbox_evict_and_expire() -> None:
    box = MemoryOutbox()
    await box.push(_entry("a", 1, "keep", created=1.0))
    await box.push(_entry("a", 2, "x", created=2.0))
    await box.push(_entry("b", 1, "x", created=1.5))
    victim = await box.evict_oldest(None, {"keep"})  # the longest in the outbox, unprotected
    assert victim is not None
    assert (victim.thread_id, victim.seq) == ("a", 2)
    assert await box.evict_oldest("a", {"keep"}) is None
    gone = await box.expire("a", created_before=1.5)
    assert [e.seq for e in gone] == [1]
    assert await box.expire("missing", 10.0) == []
    assert [e.seq for e in await box.expire("b", 10.0)] == [1]
    assert await box.entries("a") == []
    assert len(box) == 0
    await box.close()


async def test_memory_outbox_eviction_skips_what_left_and_what_is_in_flight() -> None:
    box = MemoryOutbox()
    for n in range(1, 5):
        await box.push(_entry("t", n))
    assert await box.remove("t", 1)
    victim = await box.evict_oldest(None, set(), in_flight={("t", 2)})
    assert victim is not None
    assert victim.seq == 3
    victim = await box.evict_oldest(None, set())
    assert victim is not None
    assert victim.seq == 2
    for n in range(5, 500):  # many come and go: what is kept for ordering stays bounded
        await box.push(_entry("t", n))
        assert await box.remove("t", n)
    assert len(box._arrivals) <= 2 * len(box) + 64


@pytest.mark.parametrize(
    ("message", "reason"),
    [(None, "message is None"), (1, None), ({"type": "x"}, None)],
)
def test_outbox_check(message: Any, reason: str | None) -> None:
    assert MemoryOutbox().check(message) == reason


def test_drive_refuses_a_coroutine_that_suspends() -> None:
    async def suspends() -> None:
        await asyncio.sleep(0)

    async def returns() -> int:
        return 5

    with pytest.raises(RuntimeError, match="suspended"):
        drive(suspends())
    assert drive(returns()) == 5


class SlowOutbox(MemoryOutbox):
    """An outbox that is not synchronous (like a network backend)."""

    synchronous = False


def test_sync_send_needs_a_synchronous_outbox(sink: Sink) -> None:
    guard = Guard(outbox=SlowOutbox())
    assert guard.send_sync("t", {"type": "a"}, lambda m: sink.deliver_now("t", m)) is False
    assert guard.stats().outcomes[Outcome.REJECTED] == 1
