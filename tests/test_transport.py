"""The engine's side of transport adapters: confirmation probes, serving owners, hold/replay.

These drive the engine directly (a transport is simulated by calling ``frame_sent``); the
Starlette tests cover the same paths over real sockets.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import pytest

from conftest import eventually, settle
from emitguard import ConnectionState, Guard, Outcome, transport
from emitguard.calls import Arg


class Connection:
    """A stand-in for a transport's connection object (hashable by identity)."""


async def test_cancelled_while_waiting_for_confirmation_keeps_the_event() -> None:
    """Found in review: the wait was outside the cancellation handler; the line stayed held
    and the event had no outcome."""
    guard = Guard()
    guard.confirm_deliveries(0.2)
    guard.mark_connected("t1")

    async def reports_success(message: Any) -> bool:
        return True  # the frame would come later, or never

    sending = asyncio.create_task(guard.send("t1", {"type": "a"}, reports_success))
    await asyncio.sleep(0.05)  # inside the confirmation wait
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    stats = guard.stats()
    assert stats.outcomes[Outcome.BUFFERED] == 1
    assert stats.pending == {"t1": 1}

    async def sends_a_frame(message: Any) -> bool:
        transport.frame_sent()
        return True

    # The line is free again: the kept event is being sent again (a cancel says nothing of
    # the connection), and a later send completes behind it, in order.
    assert guard.state("t1") is ConnectionState.CONNECTED
    assert await asyncio.wait_for(guard.send("t1", {"type": "b"}, sends_a_frame), 2.0)
    assert guard.stats().pending == {"t1": 2}  # "a" unconfirmed again, "b" queued behind it
    await guard.aclose()


async def test_a_frame_on_a_carrier_connection_confirms_a_late_writer() -> None:
    guard = Guard()
    guard.confirm_deliveries(0.5)
    connection = Connection()
    with transport.serving(connection):
        guard.mark_connected("t1", owner="user-1")  # owned by the connection being served
    writer_queue: asyncio.Queue[Any] = asyncio.Queue()

    async def writer() -> None:  # started outside any send: it inherits no probe
        while True:
            await writer_queue.get()
            await asyncio.sleep(0.01)
            transport.frame_sent(connection)

    task = asyncio.create_task(writer())
    try:

        async def enqueue(message: Any) -> bool:
            writer_queue.put_nowait(message)
            return True

        assert await guard.send("t1", {"type": "a"}, enqueue)
        assert await guard.send("t1", {"type": "b"}, enqueue)
        stats = guard.stats()
        assert stats.outcomes[Outcome.BUFFERED] == 0
        assert stats.outcomes[Outcome.DELIVERED] == 2
    finally:
        task.cancel()


async def test_a_frame_from_another_os_thread_before_the_wait_confirms() -> None:
    """A Channels consumer runs on the main loop while a sync agent's group_send runs on its
    own loop in a worker thread: the frame may leave before the sender starts watching its
    carriers. Found with async_to_sync senders: the frame was missed, the send judged
    unconfirmed and kept although the client had it."""
    guard = Guard(ttl=None, retry_backoff=())
    guard.confirm_deliveries(0.2)
    connection = Connection()
    guard.mark_connected("t1", owner=connection)
    # a frame of an earlier event, sent before this send started, confirms nothing
    threading.Thread(target=transport.frame_sent, args=(connection,)).start()
    await asyncio.sleep(0.01)

    async def silent(message: Any) -> bool:
        return True

    assert await guard.send("t1", {"type": "a"}, silent) is True  # kept, not lost
    assert guard.stats().outcomes[Outcome.BUFFERED] == 1
    connection = Connection()
    guard.mark_connected("t2", owner=connection)

    async def consumer_elsewhere(message: Any) -> bool:
        # the frame leaves from another OS thread (no probe in its context) before the
        # original returns, so before the guard waits for it
        other = threading.Thread(target=transport.frame_sent, args=(connection,))
        other.start()
        other.join()
        return True

    assert await guard.send("t2", {"type": "b"}, consumer_elsewhere) is True
    assert guard.stats().outcomes[Outcome.DELIVERED] == 1
    assert guard.state("t2") is ConnectionState.CONNECTED


async def test_unconfirmed_without_any_frame() -> None:
    guard = Guard(ttl=None, retry_backoff=())
    guard.confirm_deliveries(0.01)
    guard.mark_connected("t1", owner=Connection())

    async def lies(message: Any) -> bool:
        return True

    assert await guard.send("t1", {"type": "a"}, lies) is True  # kept, not lost
    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert guard.stats().pending == {"t1": 1}


async def test_hold_does_not_wait_for_a_send_parked_on_the_barrier() -> None:
    """Found in review: the parked send held the line, so hold() waited ready_timeout."""
    guard = Guard(history=10, ready_timeout=2.0)

    async def no_socket(message: Any) -> bool:
        return False

    sending = asyncio.create_task(guard.send("t1", {"type": "a"}, no_socket))
    await settle()
    started = time.monotonic()
    async with guard.hold("t1"):
        assert time.monotonic() - started < 0.5
        subscription = guard.subscribe("t1")  # associates: the parked send wakes ...
        await asyncio.sleep(0.02)
        assert not sending.done()  # ... but does not deliver before the body has ended
    assert await sending
    assert [item async for item in _first(subscription, 1)] == [(1, {"type": "a"})]
    assert guard.stats().outcomes[Outcome.DELIVERED] == 1


async def _first(subscription: Any, count: int) -> Any:
    got = 0
    async for item in subscription:
        yield item
        got += 1
        if got == count:
            return


async def test_hold_still_waits_for_a_delivery_in_progress() -> None:
    guard = Guard(history=10)
    guard.mark_connected("t1")
    gate = asyncio.Event()
    order: list[str] = []

    async def slow(message: Any) -> bool:
        await gate.wait()
        order.append("delivered")
        return True

    sending = asyncio.create_task(guard.send("t1", {"type": "a"}, slow))
    await settle()

    async def holder() -> None:
        async with guard.hold("t1"):
            order.append("held")

    holding = asyncio.create_task(holder())
    await settle()
    assert order == []
    gate.set()
    await asyncio.gather(sending, holding)
    assert order == ["delivered", "held"]


async def test_a_subscription_opened_while_serving_owns_itself() -> None:
    """Found in review: the served connection took the ownership."""
    guard = Guard()
    connection = Connection()
    with transport.serving(connection):
        subscription = guard.subscribe("t1")
    subscription.close()
    assert guard.state("t1") is ConnectionState.DISCONNECTED


@pytest.mark.parametrize("path", ["hot path", "confirmed fast path"])
async def test_stats_count_a_delivery_while_a_slow_sender_holds_the_handed_on_line(
    path: str,
) -> None:
    """Found in review: a fast-path send that handed the line on left ``slow`` False, so the
    slow holder was counted as a fast-path send in flight."""
    guard = Guard()
    if path == "confirmed fast path":
        guard.confirm_deliveries(0.5)
    guard.mark_connected("t1")
    gate = asyncio.Event()
    second_gate = asyncio.Event()

    async def first(thread_id: str, message: Any) -> bool:
        await gate.wait()
        transport.frame_sent()
        return True

    async def second(message: Any) -> bool:
        await second_gate.wait()
        transport.frame_sent()
        return True

    hot = guard.sender(Arg(0, "thread_id"), Arg(1, "message"))  # what an adapter installs
    one = asyncio.create_task(hot(first, None, ("t1", {"n": 1}), {}))
    await settle()
    two = asyncio.create_task(guard.send("t1", {"n": 2}, second))  # queues: a slow path
    await settle()
    gate.set()
    assert await one
    await settle()
    assert guard.stats().outcomes[Outcome.DELIVERED] == 1  # seq 2 holds the line, in flight
    second_gate.set()
    assert await two
    assert guard.stats().outcomes[Outcome.DELIVERED] == 2


async def test_a_dropped_send_is_kept_with_its_reason_and_sent_again(records: Any) -> None:
    guard = Guard(retry_backoff=(0.01,))
    guard.confirm_deliveries(0.5)
    guard.mark_connected("t1")
    tries: list[int] = []

    async def full_once(message: Any) -> None:  # returns as if it worked, both times
        tries.append(message["n"])
        if len(tries) == 1:
            transport.dropped("dropped for capacity: queue of 3 full")
        else:
            transport.frame_sent()

    assert await guard.send("t1", {"n": 1}, full_once)
    assert await guard.drain(2.0) == 0
    assert tries == [1, 1]
    first = records.items[0]
    assert (first.outcome, first.reason) == (
        Outcome.BUFFERED,
        "dropped for capacity: queue of 3 full; retry 1 of 1 in 0.01s",
    )
    assert records.items[-1].outcome is Outcome.FLUSHED
    transport.dropped("outside any guarded send: nothing happens")
    await guard.aclose()


async def test_owner_alive_reconnects_the_threads_failures_disconnected_only() -> None:
    guard = Guard(retry_backoff=())
    guard.confirm_deliveries(0.01)
    guard.mark_connected("a", "conn")
    guard.mark_connected("b", "conn")

    async def silent(message: Any) -> bool:
        return True  # no frame: unconfirmed, no retries left

    await guard.send("a", {"n": 1}, silent)
    assert guard.state("a") is ConnectionState.DISCONNECTED
    guard.leave("b", "conn")  # left on purpose: not the owner's any more
    assert guard.owner_alive("conn") == ["a"]
    assert guard.state("a") is ConnectionState.CONNECTED
    assert guard.state("b") is ConnectionState.DISCONNECTED
    assert guard.owner_alive("someone else") == []
    guard.disconnect_owner("conn")
    assert guard.owner_alive("conn") == []
    await guard.aclose()


async def test_a_carrier_handling_a_message_is_waited_for_past_the_timeout() -> None:
    guard = Guard()
    guard.confirm_deliveries(0.02)
    guard.mark_connected("t1", "conn")

    async def slow_consumer(message: Any) -> bool:
        async def handle() -> None:
            with transport.handling("conn"):
                await asyncio.sleep(0.2)  # ten times the confirmation timeout
                transport.frame_sent("conn")

        # (the consumer's own task, outside the send's context, like a Channels consumer)
        asyncio.get_running_loop().call_soon(
            lambda: asyncio.ensure_future(handle()), context=contextvars.Context()
        )
        return True

    assert await guard.send("t1", {"n": 1}, slow_consumer)
    assert guard.stats().outcomes[Outcome.DELIVERED] == 1
    assert guard.state("t1") is ConnectionState.CONNECTED
    await guard.aclose()


class TaggingTransport:
    """A transport that carries each message's tag to its writer, which reports the frame
    with it (as the Channels adapter does through the layer and the consumer)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.queue: asyncio.Queue[tuple[Any, int | None]] = asyncio.Queue()
        self.gate = asyncio.Event()
        self.written: list[Any] = []
        self.tagless = False
        """Report frames without their tag (a frame of the connection, not of the message)."""

    async def send(self, message: Any) -> bool:
        self.queue.put_nowait((message, transport.tag()))
        return True

    async def write(self) -> None:
        while True:
            message, tag = await self.queue.get()
            await self.gate.wait()
            self.written.append(message["n"])
            transport.frame_sent(self.connection, None if self.tagless else tag)


async def test_tagged_sends_are_confirmed_behind_in_order(records: Any) -> None:
    guard = Guard(name="tagged")
    guard.confirm_deliveries(0.5)
    connection = Connection()
    guard.mark_connected("t1", owner=connection)
    wire = TaggingTransport(connection)
    writer = asyncio.create_task(wire.write())
    try:
        for n in range(5):  # none waits for its frame: the writer is held
            assert await asyncio.wait_for(guard.send("t1", {"type": "a", "n": n}, wire.send), 1)
        assert records.items == []
        assert wire.written == []
        wire.gate.set()
        assert await guard.drain(2.0) == 0
        assert wire.written == [0, 1, 2, 3, 4]
        assert [(r.seq, r.outcome) for r in records.items] == [
            (seq, Outcome.DELIVERED) for seq in range(1, 6)
        ]
        assert transport._tagged == {}
    finally:
        writer.cancel()


async def test_a_frame_without_the_tag_does_not_confirm_a_tagged_send(records: Any) -> None:
    guard = Guard(name="tagless", retry_backoff=())
    guard.confirm_deliveries(0.1)
    connection = Connection()
    guard.mark_connected("t1", owner=connection)
    wire = TaggingTransport(connection)
    wire.tagless = True  # the connection sends frames, none of them this message's
    wire.gate.set()
    writer = asyncio.create_task(wire.write())
    try:
        assert await guard.send("t1", {"type": "a", "n": 0}, wire.send)
        await eventually(lambda: [r.outcome for r in records.items] == [Outcome.BUFFERED])
        assert wire.written == [0]
        assert "unconfirmed" in (records.items[0].reason or "")
        assert guard.stats().pending == {"t1": 1}
    finally:
        writer.cancel()
