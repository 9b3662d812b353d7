"""The engine: barrier, ordering, states, flush, failures, records, drain and stats."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest

import emitguard
from conftest import Records, Sink, settle
from emitguard import ConnectionState, EmissionError, Guard, Outcome

WANTED = "thread_id must be a hashable id (str, int, UUID, tuple, ...)"


def event(kind: str, n: int = 0) -> dict[str, Any]:
    return {"type": kind, "n": n}


async def test_send_to_connected_thread_is_delivered_once(sink: Sink, records: Records) -> None:
    guard = Guard(name="g")
    records.guard = guard
    guard.mark_connected("t")
    assert await guard.send("t", event("agent_started"), sink.for_thread("t")) is True
    assert sink.types("t") == ["agent_started"]
    [record] = records.items
    assert (record.outcome, record.seq, record.event_type, record.attempts) == (
        Outcome.DELIVERED,
        1,
        "agent_started",
        1,
    )
    assert record.reason is None
    assert record.guard_name == "g"
    assert str(record) == "thread t seq 1 agent_started: DELIVERED"


async def test_barrier_holds_sends_until_association(sink: Sink, records: Records) -> None:
    guard = Guard(ready_timeout=5.0)
    records.guard = guard
    tasks = [
        asyncio.create_task(guard.send("t", event(kind), sink.for_thread("t")))
        for kind in ("agent_started", "agent_thinking", "tool_executing")
    ]
    await settle()
    assert sink.received == {}
    assert guard.state("t") is ConnectionState.CONNECTING
    guard.mark_connected("t", owner="u1")
    assert await asyncio.gather(*tasks) == [True, True, True]
    assert sink.types("t") == ["agent_started", "agent_thinking", "tool_executing"]
    assert records.outcomes() == [Outcome.DELIVERED] * 3
    assert records.items[0].waited > 0
    assert [r.seq for r in records.items] == [1, 2, 3]


async def test_barrier_timeout_buffers_and_later_sends_do_not_wait(
    sink: Sink, records: Records
) -> None:
    guard = Guard(ready_timeout=0.02)
    records.guard = guard
    first = asyncio.create_task(guard.send("t", event("a"), sink.for_thread("t")))
    second = asyncio.create_task(guard.send("t", event("b"), sink.for_thread("t")))
    assert await first is True
    assert await second is True
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await guard.send("t", event("c"), sink.for_thread("t")) is True
    assert loop.time() - started < 0.02  # no agent waits twice
    reasons = [r.reason or "" for r in records.items]
    assert records.outcomes() == [Outcome.BUFFERED] * 3
    assert "ready_timeout=0.02" in reasons[0]
    assert "already waited" in reasons[2]
    assert guard.stats().pending == {"t": 3}
    guard.mark_connected("t")
    assert await guard.drain(1.0) == 0
    assert sink.types("t") == ["a", "b", "c"]
    assert records.outcomes()[3:] == [Outcome.FLUSHED] * 3
    assert all(r.buffered_for > 0 for r in records.of(Outcome.FLUSHED))


async def test_on_unready_buffer_does_not_wait(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer", ready_timeout=10.0)
    records.guard = guard
    assert await asyncio.wait_for(guard.send("t", event("a"), sink.for_thread("t")), 1.0)
    assert "on_unready='buffer'" in (records.items[0].reason or "")
    guard.mark_connected("t")
    await guard.drain(1.0)
    assert sink.types("t") == ["a"]


async def test_without_retries_a_failed_delivery_disconnects_and_buffers_until_reassociation(
    sink: Sink, records: Records
) -> None:
    guard = Guard(retry_backoff=())
    records.guard = guard
    guard.mark_connected("t")
    deliver = sink.for_thread("t")
    assert await guard.send("t", event("a", 1), deliver)
    sink.down.add("t")
    assert await guard.send("t", event("a", 2), deliver) is True  # accepted into the outbox
    assert guard.state("t") is ConnectionState.DISCONNECTED
    assert await guard.send("t", event("a", 3), deliver) is True  # buffered at once, no attempt
    assert sink.calls == 2
    failed = records.of(Outcome.BUFFERED)
    assert failed[0].attempts == 1
    assert failed[0].reason == "send returned False"
    assert failed[1].attempts == 0
    assert "thread disconnected" in (failed[1].reason or "")
    sink.down.clear()
    guard.mark_connected("t")
    await guard.drain(1.0)
    assert [m["n"] for m in sink.received["t"]] == [1, 2, 3]


async def test_exception_from_original_is_a_failed_delivery(sink: Sink, records: Records) -> None:
    guard = Guard(retry_backoff=())
    records.guard = guard
    guard.mark_connected("t")
    sink.raise_on.add("t")
    assert await guard.send("t", event("a"), sink.for_thread("t")) is True
    assert records.items[0].reason == "send raised ConnectionError: socket of t broke"
    assert guard.state("t") is ConnectionState.DISCONNECTED


async def test_new_sends_queue_behind_the_flush(sink: Sink) -> None:
    guard = Guard(on_unready="buffer")
    gate = asyncio.Event()

    async def slow(message: Any) -> bool:
        await gate.wait()
        return sink.deliver_now("t", message)

    for n in range(3):
        await guard.send("t", event("old", n), slow)
    guard.mark_connected("t")  # schedules the flush
    newer = asyncio.create_task(guard.send("t", event("new", 3), sink.for_thread("t")))
    await settle()
    assert sink.received == {}
    gate.set()
    assert await newer
    await guard.drain(1.0)
    assert [m["n"] for m in sink.received["t"]] == [0, 1, 2, 3]


async def test_flush_failure_stops_and_keeps_the_rest(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer")
    records.guard = guard
    deliver = sink.for_thread("t")
    for n in range(4):
        await guard.send("t", event("e", n), deliver)

    async def second_fails(message: Any) -> bool:
        if message["n"] == 1:
            return False
        return sink.deliver_now("t", message)

    for entry in await guard.pending("t"):
        entry.deliver = second_fails
    guard.mark_connected("t")
    await guard.drain(0.5)
    assert [m["n"] for m in sink.received["t"]] == [0]
    assert guard.state("t") is ConnectionState.DISCONNECTED
    assert [e.seq for e in await guard.pending("t")] == [2, 3, 4]
    guard.mark_connected("t")
    assert await guard.drain(0.5) == 3  # the same event fails again: nothing overtakes it
    for entry in await guard.pending("t"):
        entry.deliver = deliver
    guard.mark_connected("t")
    assert await guard.drain(0.5) == 0
    assert [m["n"] for m in sink.received["t"]] == [0, 1, 2, 3]


async def test_concurrent_sends_keep_call_order_while_one_is_in_flight(sink: Sink) -> None:
    guard = Guard()
    guard.mark_connected("t")
    gate = asyncio.Event()

    async def first(message: Any) -> bool:
        await gate.wait()
        return sink.deliver_now("t", message)

    a = asyncio.create_task(guard.send("t", event("e", 1), first))
    await settle()
    rest = [
        asyncio.create_task(guard.send("t", event("e", n), sink.for_thread("t"))) for n in (2, 3, 4)
    ]
    await settle()
    assert sink.received == {}
    gate.set()
    assert await asyncio.gather(a, *rest) == [True] * 4
    assert [m["n"] for m in sink.received["t"]] == [1, 2, 3, 4]


async def test_nothing_crosses_threads(sink: Sink) -> None:
    guard = Guard(on_unready="buffer")
    for thread in ("a", "b"):
        await guard.send(thread, {"type": "x", "for": thread}, sink.for_thread(thread))
    guard.mark_connected("b")
    await guard.drain(0.2)
    assert sink.received == {"b": [{"type": "x", "for": "b"}]}
    assert guard.stats().pending == {"a": 1}


async def test_disconnect_owner_only_drops_threads_no_other_owner_carries() -> None:
    guard = Guard()
    guard.mark_connected("shared", owner="u1")
    guard.mark_connected("shared", owner="u2")
    guard.mark_connected("solo", owner="u1")
    assert guard.disconnect_owner("u1") == ["solo"]
    assert guard.state("shared") is ConnectionState.CONNECTED
    assert guard.state("solo") is ConnectionState.DISCONNECTED
    assert guard.disconnect_owner("u2") == ["shared"]
    assert guard.disconnect_owner("nobody") == []


async def test_error_state_buffers_and_reassociation_recovers(sink: Sink, records: Records) -> None:
    guard = Guard(ready_timeout=5.0)
    records.guard = guard
    waiting = asyncio.create_task(guard.send("t", event("a"), sink.for_thread("t")))
    await settle()
    guard.mark_error("t", RuntimeError("db down"))
    assert await waiting  # released at once, buffered
    assert guard.state("t") is ConnectionState.ERROR
    assert "association raised RuntimeError: db down" in (records.items[0].reason or "")
    guard.mark_connected("t")
    await guard.drain(1.0)
    assert sink.types("t") == ["a"]


async def test_mark_disconnected_releases_waiters(sink: Sink) -> None:
    guard = Guard(ready_timeout=5.0)
    waiting = asyncio.create_task(guard.send("t", event("a"), sink.for_thread("t")))
    await settle()
    guard.mark_disconnected("t", "client closed the tab")
    assert await asyncio.wait_for(waiting, 1.0)
    assert guard.stats().pending == {"t": 1}


async def test_state_hook_reports_transitions() -> None:
    seen: list[tuple[str, ConnectionState, ConnectionState]] = []

    class Listener:
        @emitguard.hookimpl
        def emitguard_state_changed(
            self, thread_id: str, old: ConnectionState, new: ConnectionState
        ) -> None:
            seen.append((thread_id, old, new))

    listener = Listener()
    emitguard.register(listener)
    try:
        guard = Guard()
        guard.mark_connected("t")
        guard.mark_connected("t")  # no change, no call
        guard.mark_disconnected("t")
    finally:
        emitguard.unregister(listener)
    assert seen == [
        ("t", ConnectionState.CONNECTING, ConnectionState.CONNECTED),
        ("t", ConnectionState.CONNECTED, ConnectionState.DISCONNECTED),
    ]


async def test_wait_ready() -> None:
    guard = Guard(ready_timeout=0.01)
    assert await guard.wait_ready("t") is False
    waiter = asyncio.create_task(guard.wait_ready("t", timeout=5.0))
    await settle()
    guard.mark_connected("t")
    assert await waiter is True
    assert await guard.wait_ready("t") is True


async def test_wait_ready_does_not_count_as_a_timed_out_send(sink: Sink) -> None:
    guard = Guard(ready_timeout=5.0)
    assert await guard.wait_ready("t", timeout=0.01) is False
    task = asyncio.create_task(guard.send("t", event("a"), sink.for_thread("t")))
    await settle()
    assert not task.done()  # still waits on the barrier
    guard.mark_connected("t")
    assert await task
    assert sink.types("t") == ["a"]


async def test_stamp_seq_copies_dict_messages(sink: Sink) -> None:
    guard = Guard(stamp_seq="seq")
    guard.mark_connected("t")
    original = event("a")
    await guard.send("t", original, sink.for_thread("t"))
    await guard.send("t", "plain text", sink.for_thread("t"))
    assert sink.received["t"] == [{"type": "a", "n": 0, "seq": 1}, "plain text"]
    assert "seq" not in original


@pytest.mark.parametrize(
    ("thread_id", "expected"),
    [
        ("", f"{WANTED}, got an empty str"),
        (True, f"{WANTED}, not True"),
        (["t"], f"{WANTED}, got unhashable list ['t']"),
    ],
)
async def test_bad_thread_id_is_rejected(
    sink: Sink, records: Records, thread_id: Any, expected: str
) -> None:
    guard = Guard()
    records.guard = guard
    assert await guard.send(thread_id, event("a"), sink.for_thread("t")) is False
    [record] = records.items
    assert (record.outcome, record.reason, record.seq) == (Outcome.REJECTED, expected, 0)
    assert sink.calls == 0


@pytest.mark.parametrize(
    "thread_id", [123, uuid.UUID(int=7), ("/chat", "room-1")], ids=["int", "uuid", "tuple"]
)
async def test_any_hashable_thread_id_is_a_thread(
    sink: Sink, records: Records, thread_id: Any
) -> None:
    guard = Guard(on_unready="buffer")
    records.guard = guard
    assert await guard.send(thread_id, event("a"), sink.for_thread("t")) is True
    guard.mark_connected(thread_id)
    await guard.drain(1.0)
    assert [(r.thread_id, r.outcome) for r in records.items] == [
        (thread_id, Outcome.BUFFERED),
        (thread_id, Outcome.FLUSHED),
    ]
    assert records.items[0].thread_id is thread_id  # shown as it was given
    assert guard.stats().states == {thread_id: ConnectionState.CONNECTED}


async def test_true_is_not_thread_1(sink: Sink, records: Records) -> None:
    guard = Guard()
    records.guard = guard
    guard.mark_connected(1)
    assert await guard.send(True, event("a"), sink.for_thread("t")) is False
    assert [r.outcome for r in records.items] == [Outcome.REJECTED]
    assert sink.calls == 0


async def test_a_send_naming_no_thread_passes_through(sink: Sink, records: Records) -> None:
    guard = Guard()
    records.guard = guard

    async def broadcast(message: Any) -> str:
        sink.calls += 1
        return "as the original says"

    assert await guard.send(None, event("a"), broadcast) == "as the original says"
    [record] = records.items
    assert (record.outcome, record.thread_id, record.seq) == (Outcome.PASSED, None, 0)
    assert record.outcome.ok
    assert record.outcome.terminal
    assert sink.calls == 1
    stats = guard.stats()
    assert stats.passed_through == 1
    assert stats.states == {}


async def test_none_message_is_rejected(sink: Sink, records: Records) -> None:
    guard = Guard()
    records.guard = guard
    guard.mark_connected("t")
    assert await guard.send("t", None, sink.for_thread("t")) is False
    assert records.items[0].reason == "message is None"


async def test_awaitable_message_cannot_be_buffered(sink: Sink, records: Records) -> None:
    guard = Guard(on_unready="buffer")
    records.guard = guard
    coro = asyncio.sleep(0)
    try:
        assert await guard.send("t", coro, sink.for_thread("t")) is False
    finally:
        coro.close()
    assert records.items[0].outcome is Outcome.REJECTED
    assert "awaitable" in (records.items[0].reason or "")


async def test_strict_mode_raises_with_the_record(sink: Sink) -> None:
    guard = Guard(strict=True, on_unready="buffer", max_per_thread=1, overflow="reject")
    await guard.send("t", event("a"), sink.for_thread("t"))
    with pytest.raises(EmissionError) as caught:
        await guard.send("t", event("b"), sink.for_thread("t"))
    assert caught.value.emission.outcome is Outcome.REJECTED
    assert "outbox full, max_per_thread=1" in str(caught.value)


async def test_listener_failure_never_breaks_the_send(
    sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        @emitguard.hookimpl
        def emitguard_emission(self, emission: emitguard.Emission) -> None:
            raise RuntimeError("listener bug")

    broken = Broken()
    emitguard.register(broken)
    try:
        guard = Guard()
        guard.mark_connected("t")
        assert await guard.send("t", event("a"), sink.for_thread("t")) is True
    finally:
        emitguard.unregister(broken)
    assert sink.types("t") == ["a"]
    assert "listener failed in emitguard_emission" in caplog.text


async def test_cancelled_sender_keeps_its_event(sink: Sink, records: Records) -> None:
    guard = Guard(ready_timeout=5.0)
    records.guard = guard
    first = asyncio.create_task(guard.send("t", event("e", 1), sink.for_thread("t")))
    second = asyncio.create_task(guard.send("t", event("e", 2), sink.for_thread("t")))
    await settle()
    second.cancel()  # waiting in line behind the barrier wait
    first.cancel()  # waiting on the barrier
    for task in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await task
    guard.mark_connected("t")
    assert await guard.drain(1.0) == 0
    assert [m["n"] for m in sink.received["t"]] == [1, 2]
    # Both events were kept: the one waiting on the barrier and the one waiting in line.
    buffered = {r.seq: r.reason for r in records.of(Outcome.BUFFERED)}
    assert buffered == {
        1: "sender cancelled while waiting for the thread",
        2: "sender cancelled while waiting for its turn",
    }
    assert [r.seq for r in records.of(Outcome.FLUSHED)] == [1, 2]


async def test_association_from_another_os_thread(sink: Sink) -> None:
    guard = Guard(ready_timeout=5.0)
    task = asyncio.create_task(guard.send("t", event("a"), sink.for_thread("t")))
    await settle()
    worker = threading.Thread(target=guard.mark_connected, args=("t",))
    worker.start()
    worker.join()
    assert await asyncio.wait_for(task, 1.0)
    assert sink.types("t") == ["a"]


def test_sync_send_without_any_loop(sink: Sink) -> None:
    guard = Guard()
    assert guard.send_sync("t", event("a"), lambda m: sink.deliver_now("t", m)) is True
    assert guard.stats().pending == {"t": 1}
    guard.mark_connected("t")  # no loop anywhere: flushed right here
    assert sink.types("t") == ["a"]
    assert guard.send_sync("t", event("b"), lambda m: sink.deliver_now("t", m)) is True
    assert sink.types("t") == ["a", "b"]
    stats = guard.stats()
    assert stats.outcomes[Outcome.DELIVERED] == 1
    assert stats.outcomes[Outcome.FLUSHED] == 1


def test_association_after_the_loop_closed_flushes_in_a_private_loop(sink: Sink) -> None:
    guard = Guard(on_unready="buffer")
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(guard.send("t", event("a"), sink.for_thread("t")))
    finally:
        loop.close()
    guard.mark_connected("t")  # no loop runs anywhere: flushed right here, in a private loop
    assert sink.types("t") == ["a"]
    assert guard.stats().pending_total == 0


async def test_stats_count_hot_path_deliveries(sink: Sink) -> None:
    guard = Guard()
    manager = type("M", (), {})()
    guard.mark_connected("t")
    send = guard.sender(emitguard.calls.Arg(0, "thread_id"), emitguard.calls.Arg(1, "message"))

    async def original(thread_id: str, message: Any) -> bool:
        return sink.deliver_now(thread_id, message)

    for n in range(5):
        assert await send(original, manager, ("t", event("e", n)), {})
    sink.down.add("t")
    assert await send(original, manager, ("t", event("e", 5)), {})
    outcomes = guard.stats().outcomes
    assert outcomes[Outcome.DELIVERED] == 5
    assert outcomes[Outcome.BUFFERED] == 1


async def test_drain_times_out_on_a_thread_that_never_comes_back(sink: Sink) -> None:
    guard = Guard(on_unready="buffer")
    await guard.send("t", event("a"), sink.for_thread("t"))
    assert await guard.drain(0.05) == 1
    await guard.aclose()
    assert guard.closed
    assert guard not in emitguard.live_guards()


async def test_internal_fault_is_recorded_not_raised(
    sink: Sink, records: Records, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = Guard()
    records.guard = guard

    def broken(*args: Any) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(guard._table, "take", broken)
    assert await guard.send("t", event("a"), sink.for_thread("t")) is False
    assert records.items[0].outcome is Outcome.FAILED
    assert "emitguard internal error: KeyError" in (records.items[0].reason or "")
    assert "emitguard internal error" in caplog.text
