"""Engine edge paths: poison in the outbox, a backend that loses or drops entries, dead loops,
cancellation in strict mode, internal faults on every send path."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import emitguard
from conftest import Records, Sink, settle
from emitguard import ConnectionState, Guard, MemoryOutbox, OutboxEntry, Outcome


async def test_poison_in_the_outbox_fails_and_the_flush_goes_on(
    sink: Sink, records: Records
) -> None:
    guard = Guard(on_unready="buffer")
    records.guard = guard

    async def picky(message: Any) -> bool:
        if message == "bad":
            raise TypeError("Object of type set is not JSON serializable")
        return sink.deliver_now("t", message)

    for message in ("a", "bad", "c"):
        await guard.send("t", message, picky)
    guard.mark_connected("t")
    assert await guard.drain(1.0) == 0
    assert sink.received["t"] == ["a", "c"]
    [failed] = records.of(Outcome.FAILED)
    assert failed.seq == 2
    assert "TypeError" in (failed.reason or "")
    assert "not retried" in (failed.reason or "")
    assert guard.state("t") is ConnectionState.CONNECTED


async def test_poison_on_the_hot_path_does_not_disconnect(sink: Sink, records: Records) -> None:
    guard = Guard()
    records.guard = guard
    guard.mark_connected("t")

    async def picky(message: Any) -> bool:
        raise ValueError("bad payload")

    assert await guard.send("t", "x", picky) is False
    assert records.outcomes() == [Outcome.FAILED]
    assert guard.state("t") is ConnectionState.CONNECTED


def test_poison_on_a_sync_send(sink: Sink) -> None:
    guard = Guard()
    guard.mark_connected("t")

    def picky(message: Any) -> bool:
        raise TypeError("nope")

    assert guard.send_sync("t", "x", picky) is False
    assert guard.stats().outcomes[Outcome.FAILED] == 1
    assert guard.state("t") is ConnectionState.CONNECTED


class LosingOutbox(MemoryOutbox):
    """A broken backend: forgets what it was given."""

    async def head(self, thread_id: str) -> OutboxEntry | None:
        return None


async def test_a_backend_that_loses_entries_is_reported(
    sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    guard = Guard(outbox=LosingOutbox(), on_unready="buffer")
    await guard.send("t", "a", sink.for_thread("t"))
    guard.mark_connected("t")
    assert await guard.drain(0.5) == 0
    assert "lost 1 event(s) of thread t" in caplog.text


async def test_entry_without_a_send_fails(records: Records) -> None:
    guard = Guard(on_unready="buffer")
    records.guard = guard
    await guard.send("t", "a", Sink().for_thread("t"))
    for entry in await guard.pending("t"):
        entry.deliver = None
    guard.mark_connected("t")
    await guard.drain(0.5)
    assert records.of(Outcome.FAILED)[0].reason == "no send to deliver it with"


class ForgetfulRemove(MemoryOutbox):
    async def remove(self, thread_id: str, seq: int) -> bool:
        await super().remove(thread_id, seq)
        return False


async def test_settling_an_entry_the_backend_no_longer_holds_is_logged(
    sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    guard = Guard(outbox=ForgetfulRemove(), on_unready="buffer")
    await guard.send("t", "a", sink.for_thread("t"))
    guard.mark_connected("t")
    assert await guard.drain(0.2) == 0
    assert "no longer holds t seq 1" in caplog.text
    assert sink.received["t"] == ["a"]  # delivered once: the failed remove() does not loop
    assert guard.stats().outcomes[Outcome.FLUSHED] == 1


async def test_pending_lists_every_thread_oldest_first(sink: Sink) -> None:
    guard = Guard(on_unready="buffer")
    for thread in ("b", "a", "b"):
        await guard.send(thread, thread, sink.for_thread(thread))
    assert [(e.thread_id, e.seq) for e in await guard.pending()] == [("a", 1), ("b", 1), ("b", 2)]
    assert repr(guard).endswith("threads=2 pending=3>")


async def test_cancelled_in_line_in_strict_mode_is_still_recorded(sink: Sink) -> None:
    guard = Guard(strict=True, ready_timeout=5.0, max_per_thread=1, overflow="reject")
    first = asyncio.create_task(guard.send("t", "a", sink.for_thread("t")))
    await settle()
    second = asyncio.create_task(guard.send("t", "b", sink.for_thread("t")))
    third = asyncio.create_task(guard.send("t", "c", sink.for_thread("t")))
    await settle()
    first.cancel()  # buffered: the outbox is now full
    await settle()
    third.cancel()  # waiting in line: its place is kept for its turn
    second.cancel()  # holds the line now; the full outbox rejects its event, no caller left
    for task in (first, second, third):
        with pytest.raises(asyncio.CancelledError):
            await task
    await settle()
    stats = guard.stats()
    assert stats.outcomes[Outcome.BUFFERED] == 1
    assert stats.outcomes[Outcome.REJECTED] == 2  # b, then c in its turn


async def test_owned_ticket_cancelled_before_it_runs_releases_the_line(sink: Sink) -> None:
    guard = Guard()
    guard.mark_connected("t")
    gate = asyncio.Event()

    async def slow(message: Any) -> bool:
        await gate.wait()
        return sink.deliver_now("t", message)

    first = asyncio.create_task(guard.send("t", "a", slow))
    await settle()
    second = asyncio.create_task(guard.send("t", "b", sink.for_thread("t")))
    await settle()
    gate.set()
    await asyncio.sleep(0)  # first finishes and hands the line to second's ticket ...
    second.cancel()  # ... which is cancelled before it could run
    assert await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert await guard.drain(1.0) == 0
    assert sink.received["t"] == ["a", "b"]
    assert await guard.send("t", "c", sink.for_thread("t"))  # the line is free again
    assert sink.received["t"] == ["a", "b", "c"]


async def test_cancelled_during_send_keeps_the_event(sink: Sink, records: Records) -> None:
    guard = Guard(stamp_seq="seq")  # not the hot path
    records.guard = guard
    guard.mark_connected("t")
    started = asyncio.Event()

    async def hangs(message: Any) -> bool:
        started.set()
        await asyncio.Event().wait()
        return True

    task = asyncio.create_task(guard.send("t", {"type": "a"}, hangs))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert records.items[-1].outcome is Outcome.BUFFERED
    assert records.items[-1].reason == "sender cancelled during send"
    assert records.items[-1].attempts == 1


async def test_cancelled_on_the_hot_path_keeps_the_event(sink: Sink) -> None:
    guard = Guard()
    guard.mark_connected("t")
    send = guard.sender(emitguard.calls.Arg(0, None), emitguard.calls.Arg(1, None))
    started = asyncio.Event()

    async def hangs(thread_id: str, message: Any) -> bool:
        started.set()
        await asyncio.Event().wait()
        return True

    task = asyncio.create_task(send(hangs, None, ("t", "a"), {}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert guard.stats().pending == {"t": 1}  # kept, to be sent again (at least once)
    assert guard.state("t") is ConnectionState.CONNECTED  # a cancel says nothing of the socket
    await guard.aclose()


def test_a_line_whose_holder_died_with_its_loop_is_reset_on_association(
    sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    guard = Guard(ready_timeout=5.0)

    async def abandon() -> None:
        asyncio.get_running_loop().create_task(guard.send("t", "a", sink.for_thread("t")))
        await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(abandon())  # the sender holds the line, waiting on the barrier
    loop.close()  # ... and dies with its loop without being cancelled
    guard.send_sync("t", "b", lambda m: sink.deliver_now("t", m))
    with caplog.at_level(logging.WARNING, logger="emitguard"):
        guard.mark_connected("t")
    assert "line reset" in caplog.text
    assert sink.received["t"] == ["b"]


def test_internal_fault_on_a_sync_send(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = Guard()
    monkeypatch.setattr(guard._table, "take", lambda *a, **k: 1 / 0)
    assert guard.send_sync("t", "a", lambda m: True) is False
    assert guard.stats().outcomes[Outcome.FAILED] == 1


async def test_internal_fault_after_a_hot_path_failure(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = Guard()
    guard.mark_connected("t")
    sink.down.add("t")
    send = guard.sender(emitguard.calls.Arg(0, None), emitguard.calls.Arg(1, None))
    monkeypatch.setattr(guard._flow, "buffer", lambda *a: 1 / 0)

    async def original(thread_id: str, message: Any) -> bool:
        return sink.deliver_now(thread_id, message)

    assert await send(original, None, ("t", "a"), {}) is False
    assert guard.stats().outcomes[Outcome.FAILED] == 1
    assert guard._table.slots["t"].line  # its token is back: the line is free


async def test_lifecycle_calls_from_another_os_thread_take_effect_at_once() -> None:
    guard = Guard()
    guard.mark_connected("t", owner="u")
    assert await guard.wait_ready("t")  # remembers the running loop
    await asyncio.to_thread(guard.mark_error, "t", "boom")
    await settle()
    assert guard.state("t") is ConnectionState.ERROR
    await asyncio.to_thread(guard.mark_disconnected, "t")
    await settle()
    assert guard.state("t") is ConnectionState.DISCONNECTED
    guard.mark_connected("t", owner="u")
    assert await asyncio.to_thread(guard.disconnect_owner, "u") == ["t"]
    await settle()
    assert guard.state("t") is ConnectionState.DISCONNECTED


def test_lifecycle_calls_reject_bad_thread_ids() -> None:
    guard = Guard()
    for call in (guard.mark_connected, guard.mark_disconnected):
        with pytest.raises(ValueError, match=r"thread_id must be a hashable id .* empty str"):
            call("")
    with pytest.raises(ValueError, match="not None"):
        guard.mark_error(None, "x")  # type: ignore[arg-type]


async def test_a_flush_cancelled_while_waiting_for_the_line_does_not_free_it() -> None:
    """Found in review: a queued flush task cancelled before its turn released the line it
    never held, and the same event went out twice."""
    guard = Guard(on_unready="buffer")
    got: list[tuple[str, int]] = []
    gate = asyncio.Event()

    async def slow(message: Any) -> bool:
        got.append(("start", message["n"]))
        await gate.wait()
        got.append(("done", message["n"]))
        return True

    async def fast(message: Any) -> bool:
        got.append(("fast", message["n"]))
        return True

    await guard.send("t", {"n": 1}, slow)  # buffered
    guard.mark_connected("t")  # a flush takes the line and delivers n=1 slowly
    await asyncio.sleep(0.01)
    holder = set(guard._flow.tasks)
    guard.mark_connected("t")  # a second flush queues for the line
    await asyncio.sleep(0)
    [queued] = guard._flow.tasks - holder  # (a set: its order says nothing about which is which)
    queued.cancel()
    await asyncio.sleep(0.01)
    sender = asyncio.create_task(guard.send("t", {"n": 2}, fast))
    await asyncio.sleep(0.01)
    gate.set()
    assert await sender
    assert await guard.drain(1.0) == 0
    assert got == [("start", 1), ("done", 1), ("fast", 2)]
    assert guard.stats().outcomes[Outcome.FLUSHED] == 1
