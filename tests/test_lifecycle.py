"""A guard's lifecycle and memory: closing, sends after close, what is left at exit, idle
threads freed, cumulative counts, and the API's shape."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import emitguard
from conftest import Records, Sink
from emitguard import ConnectionState, Guard, MemoryOutbox, Outcome


class ClosingOutbox(MemoryOutbox):
    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


async def test_async_with_closes_the_guard_and_its_outbox(sink: Sink) -> None:
    outbox = ClosingOutbox()
    async with Guard(outbox=outbox) as guard:
        guard.mark_connected("t")
        assert await guard.send("t", "a", sink.for_thread("t"))
    assert guard.closed
    assert outbox.closed == 1
    assert guard not in emitguard.live_guards()
    await guard.aclose()  # closing twice is harmless
    assert outbox.closed == 1


async def test_a_send_to_a_closed_guard_goes_to_the_original_unguarded(
    sink: Sink, records: Records, caplog: pytest.LogCaptureFixture
) -> None:
    guard = Guard(on_unready="buffer")
    records.guard = guard
    await guard.aclose()
    with caplog.at_level(logging.WARNING, logger="emitguard"):
        assert await guard.send("t", "a", sink.for_thread("t")) is True
        sink.down.add("t")
        assert await guard.send("t", "b", sink.for_thread("t")) is False
        assert guard.send_sync("t", "c", lambda m: sink.deliver_now("u", m)) is True
    assert sink.received == {"t": ["a"], "u": ["c"]}  # no barrier, no outbox: straight through
    assert [r.outcome for r in records.items] == [
        Outcome.DELIVERED,
        Outcome.FAILED,
        Outcome.DELIVERED,
    ]
    assert all("guard closed" in (r.reason or "") for r in records.items)
    assert caplog.text.count("guard is closed") == 1  # logged once


async def test_closing_logs_what_is_still_buffered(
    sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    guard = Guard(on_unready="buffer")
    for thread in ("t1", "t2", "t2"):
        await guard.send(thread, "x", sink.for_thread(thread))
    with caplog.at_level(logging.WARNING, logger="emitguard"):
        await guard.aclose()
    assert "3 event(s) still buffered for 2 thread(s): 't1', 't2'" in caplog.text


def test_events_buffered_at_interpreter_exit_are_logged() -> None:
    code = textwrap.dedent(
        """
        import asyncio, logging
        import emitguard

        logging.basicConfig(level=logging.WARNING)
        guard = emitguard.Guard(on_unready="buffer")

        async def send(message):
            return True

        asyncio.run(guard.send("t-9", {"type": "agent_done"}, send))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "at interpreter exit" in done.stderr
    assert "1 event(s) still buffered for 1 thread(s): 't-9'" in done.stderr


async def test_threads_that_came_and_went_are_forgotten_and_counts_stay_exact(
    sink: Sink,
) -> None:
    guard = Guard(idle_threads=10)
    for i in range(5000):
        thread = f"t{i}"
        guard.mark_connected(thread, owner=f"u{i}")
        for n in range(3):
            assert await guard.send(thread, n, sink.for_thread(thread))
        assert guard.disconnect_owner(f"u{i}") == [thread]
    assert len(list(guard.threads())) <= 10  # the ten idle threads most recently left
    assert guard.state("t4999") is ConnectionState.DISCONNECTED  # recent: still known
    assert guard.state("t0") is ConnectionState.CONNECTING  # forgotten
    stats = guard.stats()
    assert stats.outcomes[Outcome.DELIVERED] == 15_000
    assert stats.pending == {}


async def test_a_forgotten_thread_with_a_window_goes_on_counting(sink: Sink) -> None:
    guard = Guard(history=5, idle_threads=0)
    guard.mark_connected("t", owner="u")
    for n in range(3):
        await guard.send("t", {"n": n}, sink.for_thread("t"))
    guard.disconnect_owner("u")
    assert list(guard.threads()) == []  # forgotten at once (idle_threads=0)
    guard.mark_connected("t", owner="u")
    await guard.send("t", {"n": 3}, sink.for_thread("t"))
    replay = guard.replay("t", after=1)
    assert [seq for seq, _ in replay.messages] == [2, 3, 4]
    assert replay.complete


async def test_the_replay_window_is_bounded_in_total() -> None:
    guard = Guard(history=10, history_total=100)

    async def deliver(message: Any) -> bool:
        return True

    for i in range(50):
        guard.mark_connected(f"t{i}")
        for n in range(10):
            await guard.send(f"t{i}", n, deliver)
    assert guard.replay("t0", after=0).complete is False  # its messages went first
    assert [seq for seq, _ in guard.replay("t49", after=0).messages] == list(range(1, 11))
    assert guard._window is not None
    assert len(guard._window) == 100


def test_the_api_is_exported_by_audience() -> None:
    import emitguard.engine
    import emitguard.extending

    assert callable(emitguard.guard)  # the function, not a module of the same name
    assert emitguard.engine.Guard is emitguard.Guard
    for name in ("Replay", "Subscription", "GuardStats", "Emission", "OutboxEntry"):
        assert name in emitguard.__all__
    for name in ("Arg", "Call", "MISSING", "Verdict", "GUARD_ARGUMENTS", "transport"):
        assert hasattr(emitguard.extending, name)
    assert not any(name in emitguard.__all__ for name in ("Arg", "Call", "MISSING"))


def test_default_guard_names_are_unique() -> None:
    assert Guard().name != Guard().name


def test_the_built_in_adapter_is_found_without_package_metadata() -> None:
    code = textwrap.dedent(
        """
        from importlib import metadata
        metadata.entry_points = lambda **kw: []  # a source checkout: nothing declared
        import emitguard
        from emitguard.testing import ReferenceManager
        guard = emitguard.guard(ReferenceManager(), disconnect="disconnect_user")
        print(type(guard).__name__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "Guard"


async def test_drain_waits_for_a_thread_that_reconnects(sink: Sink) -> None:
    guard = Guard()
    guard.mark_connected("t", owner="u")
    guard.disconnect_owner("u")
    for n in range(3):
        await guard.send("t", n, sink.for_thread("t"))
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, guard.mark_connected, "t", "u")  # the client comes back
    assert await guard.drain(2.0) == 0
    assert sink.received["t"] == [0, 1, 2]
