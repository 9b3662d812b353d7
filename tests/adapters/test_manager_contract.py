"""The legacy contract through the manager adapter: return values, failing originals,
associations that fail or raise, disconnects, the report's race end to end and event loops
that close while events are buffered."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import threading
from typing import TYPE_CHECKING, Any

import pytest

import emitguard
from emitguard import ConnectionState, Outcome
from emitguard.testing import ReferenceManager, SyncReferenceManager

if TYPE_CHECKING:
    from manager_support import GuardTarget, Recorder

pytest_plugins = ["manager_support"]


LEGACY_LOGGER = "emitguard.testing.legacy"
AGENT_EVENTS = ["agent_started", "agent_thinking", "tool_executing", "agent_completed"]


class FlakyManager:
    """Legacy manager whose send raises while ``failures`` is positive."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.delivered: list[Any] = []
        self.threads: set[str] = set()

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("socket reset by peer")
        if thread_id not in self.threads:
            return False
        self.delivered.append(message)
        return True

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        self.threads.add(thread_id)
        return True


class SyncFlakyManager(FlakyManager):
    def send_to_thread(self, thread_id: str, message: Any) -> bool:  # type: ignore[override]
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("socket reset by peer")
        self.delivered.append(message)
        return True


class RaisingAssociation(ReferenceManager):
    """``update_connection_thread`` raises ``errors`` in turn, then works."""

    def __init__(self, *errors: Exception) -> None:
        super().__init__()
        self.errors = list(errors)

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        if self.errors:
            raise self.errors.pop(0)
        return super().update_connection_thread(user_id, thread_id)


def legacy_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LEGACY_LOGGER and record.levelno == logging.WARNING
    ]


# -- return values ---------------------------------------------------------------------------


async def test_guarded_send_returns_bool_like_the_original(guard_target: GuardTarget) -> None:
    manager = ReferenceManager()
    guard_target(manager, on_unready="buffer")
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")

    delivered = await manager.send_to_thread("t1", {"type": "a"})
    buffered = await manager.send_to_thread("t2", {"type": "b"})
    rejected = await manager.send_to_thread("t1", None)

    assert (delivered, buffered, rejected) == (True, True, False)
    assert all(type(result) is bool for result in (delivered, buffered, rejected))


def test_guarded_sync_send_returns_bool(guard_target: GuardTarget) -> None:
    manager = SyncReferenceManager()
    guard_target(manager)
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")

    result = manager.send_to_thread("t1", {"type": "a"})

    assert result is True
    assert manager.received("t1") == [{"type": "a"}]


async def test_send_returning_false_on_a_connected_thread_buffers(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager, retry_backoff=())
    first = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    manager.drop_connection(first.connection_id)  # the manager forgets the socket

    assert await manager.send_to_thread("t1", {"type": "a"}) is True

    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert recorded.outcomes() == [Outcome.BUFFERED]
    assert recorded.emissions[0].reason == "send returned False"
    second = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0
    assert second.received == [{"type": "a"}]
    assert recorded.outcomes()[-1] is Outcome.FLUSHED


# -- originals that raise --------------------------------------------------------------------


async def test_async_send_that_raises_is_a_failed_delivery(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = FlakyManager()
    guard = guard_target(manager, retry_backoff=())
    manager.update_connection_thread("u1", "t1")
    manager.failures = 1

    assert await manager.send_to_thread("t1", {"type": "a"}) is True  # no exception

    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert recorded.outcomes() == [Outcome.BUFFERED]
    assert recorded.emissions[0].reason == "send raised ConnectionError: socket reset by peer"
    assert manager.delivered == []

    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0
    assert manager.delivered == [{"type": "a"}]
    assert recorded.outcomes() == [Outcome.BUFFERED, Outcome.FLUSHED]
    assert recorded.emissions[-1].attempts == 2


async def test_async_send_that_raises_while_others_wait_keeps_order(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = FlakyManager()
    guard = guard_target(manager)
    manager.update_connection_thread("u1", "t1")
    manager.failures = 1

    results = await asyncio.gather(
        *(manager.send_to_thread("t1", {"type": t}) for t in AGENT_EVENTS)
    )
    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0

    assert results == [True] * 4
    assert [m["type"] for m in manager.delivered] == AGENT_EVENTS


def test_sync_send_that_raises_is_a_failed_delivery(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = SyncFlakyManager(failures=1)
    guard = guard_target(manager, retry_backoff=())
    manager.update_connection_thread("u1", "t1")

    assert manager.send_to_thread("t1", "a") is True

    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert recorded.emissions[0].reason == "send raised ConnectionError: socket reset by peer"
    manager.update_connection_thread("u1", "t1")
    assert manager.delivered == ["a"]
    assert recorded.outcomes() == [Outcome.BUFFERED, Outcome.FLUSHED]


async def test_socket_failure_inside_reference_manager_buffers_and_recovers(
    guard_target: GuardTarget, caplog: pytest.LogCaptureFixture
) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager)
    socket = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    socket.fail_next = 1

    assert await manager.send_to_thread("t1", {"type": "a"}) is True

    assert guard.stats().pending == {"t1": 1}
    assert manager.lost == 1  # the legacy manager saw it fail
    fresh = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0
    assert fresh.received == [{"type": "a"}]


# -- "-> None" originals ---------------------------------------------------------------------


@pytest.mark.parametrize("annotation", [None, "None"], ids=["None", "'None'"])
async def test_send_annotated_none_succeeds_when_it_does_not_raise(
    guard_target: GuardTarget, recorded: Recorder, annotation: object
) -> None:
    class Manager:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        async def send_to_thread(self, thread_id: str, message: Any):  # type: ignore[no-untyped-def]
            self.sent.append(message)

        def update_connection_thread(self, user_id: str, thread_id: str):  # type: ignore[no-untyped-def]
            pass

    Manager.send_to_thread.__annotations__["return"] = annotation
    Manager.update_connection_thread.__annotations__["return"] = annotation
    manager = Manager()
    guard = guard_target(manager)

    manager.update_connection_thread("u1", "t1")
    assert guard.state("t1") is ConnectionState.CONNECTED
    assert await manager.send_to_thread("t1", {"type": "a"}) is True

    assert manager.sent == [{"type": "a"}]
    assert recorded.outcomes() == [Outcome.DELIVERED]


def test_sync_send_annotated_none_succeeds_when_it_does_not_raise(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    class Manager:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        def send_to_thread(self, thread_id: str, message: Any) -> None:
            self.sent.append(message)

        def update_connection_thread(self, user_id: str, thread_id: str) -> None:
            pass

    manager = Manager()
    guard_target(manager)
    manager.update_connection_thread("u1", "t1")

    assert manager.send_to_thread("t1", "a") is True
    assert manager.sent == ["a"]
    assert recorded.outcomes() == [Outcome.DELIVERED]


async def test_send_annotated_none_that_raises_is_buffered(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    class Manager:
        def __init__(self) -> None:
            self.broken = True
            self.sent: list[Any] = []

        async def send_to_thread(self, thread_id: str, message: Any) -> None:
            if self.broken:
                raise ConnectionError("gone")
            self.sent.append(message)

        def update_connection_thread(self, user_id: str, thread_id: str) -> None:
            pass

    manager = Manager()
    guard = guard_target(manager)
    manager.update_connection_thread("u1", "t1")

    assert await manager.send_to_thread("t1", "a") is True
    assert recorded.outcomes() == [Outcome.BUFFERED]
    manager.broken = False
    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0
    assert manager.sent == ["a"]


async def test_unannotated_send_that_returns_nothing_delivers_each_event_once(
    guard_target: GuardTarget,
) -> None:
    """BUG: a legacy send with no return annotation that returns nothing (``None``) is
    taken for a failed delivery: its event is buffered although the socket got it, every
    later association sends it again, and the events behind it are never delivered."""

    class Manager:
        def __init__(self) -> None:
            self.socket: list[Any] = []

        async def send_to_thread(self, thread_id, message):  # type: ignore[no-untyped-def]
            self.socket.append(message)

        def update_connection_thread(self, user_id, thread_id):  # type: ignore[no-untyped-def]
            return True

    manager = Manager()
    guard = guard_target(manager)
    manager.update_connection_thread("u1", "t1")

    assert await manager.send_to_thread("t1", "a") is True
    assert await manager.send_to_thread("t1", "b") is True
    manager.update_connection_thread("u1", "t1")  # e.g. the user reloads the page
    await guard.drain(timeout=0.5)

    assert manager.socket == ["a", "b"]


# -- associations -----------------------------------------------------------------------------


async def test_association_returning_false_leaves_the_thread_unready(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager, ready_timeout=0.05)

    assert manager.update_connection_thread("u1", "t1") is False  # u1 has no connection
    assert guard.state("t1") is ConnectionState.CONNECTING  # not made ready

    assert await manager.send_to_thread("t1", {"type": "a"}) is True  # waited, then kept
    assert recorded.outcomes() == [Outcome.BUFFERED]
    assert "within ready_timeout=0.05s" in (recorded.emissions[0].reason or "")
    assert recorded.emissions[0].waited >= 0.04

    socket = manager.connect("u1")
    assert manager.update_connection_thread("u1", "t1") is True
    assert await guard.drain(timeout=1.0) == 0
    assert socket.received == [{"type": "a"}]


async def test_failed_association_of_another_user_keeps_a_carried_thread_connected(
    guard_target: GuardTarget,
) -> None:
    """Bob's failed association leaves the thread alice's socket carries connected."""
    manager = ReferenceManager()
    guard = guard_target(manager, disconnect="disconnect_user")
    alice = manager.connect("alice")
    manager.update_connection_thread("alice", "t1")

    assert manager.update_connection_thread("bob", "t1") is False  # bob has no socket

    assert await manager.send_to_thread("t1", {"type": "a"}) is True
    assert alice.received == [{"type": "a"}]  # the legacy manager would deliver it
    assert guard.state("t1") is ConnectionState.CONNECTED


async def test_association_that_raises_propagates_and_marks_error(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    boom = RuntimeError("registry unavailable")
    manager = RaisingAssociation(boom)
    socket = manager.connect("u1")
    guard = guard_target(manager, ready_timeout=5.0)

    with pytest.raises(RuntimeError) as caught:
        manager.update_connection_thread("u1", "t1")

    assert caught.value is boom
    assert guard.state("t1") is ConnectionState.ERROR
    assert await manager.send_to_thread("t1", {"type": "a"}) is True
    assert recorded.emissions[0].waited == 0  # buffered at once: no barrier wait in ERROR
    reason = recorded.emissions[0].reason or ""
    assert "in error" in reason
    assert "association raised RuntimeError: registry unavailable" in reason

    assert manager.update_connection_thread("u1", "t1") is True
    assert await guard.drain(timeout=1.0) == 0
    assert socket.received == [{"type": "a"}]
    assert recorded.outcomes() == [Outcome.BUFFERED, Outcome.FLUSHED]


async def test_async_association_that_raises_propagates_and_marks_error(
    guard_target: GuardTarget,
) -> None:
    boom = TimeoutError("db timeout")

    class Manager(FlakyManager):
        async def update_connection_thread(self, user_id: str, thread_id: str) -> bool:  # type: ignore[override]
            raise boom

    manager = Manager()
    guard = guard_target(manager)

    with pytest.raises(TimeoutError) as caught:
        await manager.update_connection_thread("u1", "t1")

    assert caught.value is boom
    assert guard.state("t1") is ConnectionState.ERROR


async def test_association_raising_wakes_a_waiting_send_into_the_outbox(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = RaisingAssociation(RuntimeError("nope"))
    manager.connect("u1")
    guard = guard_target(manager, ready_timeout=5.0)

    task = asyncio.create_task(manager.send_to_thread("t1", {"type": "a"}))
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError):
        manager.update_connection_thread("u1", "t1")

    assert await asyncio.wait_for(task, 1.0) is True
    assert guard.stats().pending == {"t1": 1}
    assert recorded.outcomes() == [Outcome.BUFFERED]


async def test_association_with_a_bad_thread_id_is_ignored(
    guard_target: GuardTarget, caplog: pytest.LogCaptureFixture
) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager)
    manager.connect("u1")

    with caplog.at_level(logging.WARNING, logger="emitguard.adapters.manager"):
        assert manager.update_connection_thread("u1", True) is True  # type: ignore[arg-type]

    assert list(guard.threads()) == []
    assert any("called with thread True: not a thread id" in r.getMessage() for r in caplog.records)


async def test_association_with_an_unhashable_owner_marks_the_thread_connected(
    guard_target: GuardTarget,
) -> None:
    """BUG: a plain (unhashable) dataclass user makes the guard miss the association."""

    @dataclasses.dataclass
    class User:
        name: str

    class Manager(FlakyManager):
        def update_connection_thread(self, user: User, thread_id: str) -> bool:  # type: ignore[override]
            self.threads.add(thread_id)
            return True

    manager = Manager()
    guard = guard_target(manager)

    assert manager.update_connection_thread(User("alice"), "t1") is True

    assert guard.state("t1") is ConnectionState.CONNECTED


async def test_disconnect_with_an_unhashable_owner_does_not_raise(
    guard_target: GuardTarget, caplog: pytest.LogCaptureFixture
) -> None:
    class Manager(FlakyManager):
        def disconnect_user(self, user: object) -> None:
            pass

    manager = Manager()
    guard = guard_target(manager, disconnect="disconnect_user")
    manager.update_connection_thread("bob", "t1")

    with caplog.at_level(logging.ERROR, logger="emitguard.adapters.manager"):
        assert manager.disconnect_user({"name": "alice"}) is None

    assert guard.state("t1") is ConnectionState.CONNECTED  # bob still carries it
    assert not caplog.records  # an unhashable owner is keyed by identity, not an error


# -- disconnects ------------------------------------------------------------------------------


async def test_disconnect_marks_threads_no_other_owner_carries(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager, disconnect="disconnect_user")
    manager.connect("u1")
    u2 = manager.connect("u2")
    manager.update_connection_thread("u1", "t1")
    manager.update_connection_thread("u2", "t1")
    manager.update_connection_thread("u1", "t2")

    manager.disconnect_user("u1")

    assert guard.state("t1") is ConnectionState.CONNECTED  # u2 still carries it
    assert guard.state("t2") is ConnectionState.DISCONNECTED
    assert await manager.send_to_thread("t1", {"type": "a"}) is True
    assert u2.received == [{"type": "a"}]

    manager.disconnect_user("u2")
    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert await manager.send_to_thread("t1", {"type": "b"}) is True
    assert guard.stats().pending == {"t1": 1}
    assert recorded.outcomes() == [Outcome.DELIVERED, Outcome.BUFFERED]
    assert "disconnect_user called" in (recorded.emissions[-1].reason or "")


async def test_disconnect_by_keyword_and_of_an_unknown_user(guard_target: GuardTarget) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager, disconnect="disconnect_user")
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")

    manager.disconnect_user(user_id="nobody")
    assert guard.state("t1") is ConnectionState.CONNECTED
    manager.disconnect_user(user_id="u1")
    assert guard.state("t1") is ConnectionState.DISCONNECTED


async def test_disconnect_that_raises_propagates_and_still_disconnects(
    guard_target: GuardTarget,
) -> None:
    boom = OSError("close failed")

    class Manager(ReferenceManager):
        def disconnect_user(self, user_id: str) -> None:
            super().disconnect_user(user_id)
            raise boom

    manager = Manager()
    guard = guard_target(manager, disconnect="disconnect_user")
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")

    with pytest.raises(OSError, match="close failed") as caught:
        manager.disconnect_user("u1")

    assert caught.value is boom
    assert guard.state("t1") is ConnectionState.DISCONNECTED


# -- the report's race, end to end -------------------------------------------------------------


async def agent_run(manager: ReferenceManager, thread_id: str) -> list[bool]:
    """An agent that starts emitting as soon as it is scheduled."""
    return [await manager.send_to_thread(thread_id, {"type": kind}) for kind in AGENT_EVENTS]


async def websocket_handshake(manager: ReferenceManager, user_id: str, thread_id: str) -> None:
    """The WebSocket handler associates the thread a little later."""
    await asyncio.sleep(0.05)
    manager.update_connection_thread(user_id, thread_id)


async def test_race_unguarded_loses_the_early_events(caplog: pytest.LogCaptureFixture) -> None:
    manager = ReferenceManager()
    socket = manager.connect("u1")

    with caplog.at_level(logging.WARNING, logger=LEGACY_LOGGER):
        results, _ = await asyncio.gather(
            agent_run(manager, "t1"), websocket_handshake(manager, "u1", "t1")
        )

    assert results == [False] * 4
    assert socket.received == []
    assert manager.lost == 4
    assert all(
        w.startswith("Cannot deliver message for thread t1") for w in legacy_warnings(caplog)
    )
    assert len(legacy_warnings(caplog)) == 4


async def test_race_guarded_delivers_every_event_in_order(
    guard_target: GuardTarget, recorded: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    manager = ReferenceManager()
    socket = manager.connect("u1")
    guard_target(manager, disconnect="disconnect_user", stamp_seq="seq")

    with caplog.at_level(logging.WARNING, logger=LEGACY_LOGGER):
        results, _ = await asyncio.gather(
            agent_run(manager, "t1"), websocket_handshake(manager, "u1", "t1")
        )

    assert results == [True] * 4
    assert [m["type"] for m in socket.received] == AGENT_EVENTS
    assert [m["seq"] for m in socket.received] == [1, 2, 3, 4]
    assert manager.lost == 0
    assert legacy_warnings(caplog) == []
    assert recorded.outcomes() == [Outcome.DELIVERED] * 4
    assert recorded.emissions[0].waited >= 0.03


async def test_race_guarded_with_concurrent_emitters(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    socket = manager.connect("u1")
    guard_target(manager)

    tasks = [
        asyncio.create_task(manager.send_to_thread("t1", {"type": kind})) for kind in AGENT_EVENTS
    ]
    await websocket_handshake(manager, "u1", "t1")

    assert await asyncio.gather(*tasks) == [True] * 4
    assert [m["type"] for m in socket.received] == AGENT_EVENTS
    assert recorded.outcomes() == [Outcome.DELIVERED] * 4
    assert recorded.emissions[0].waited > 0


# -- event loops that close while events are buffered -------------------------------------------


def test_events_buffered_in_a_closed_loop_flush_on_a_later_sync_association(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    socket = manager.connect("u1")
    guard = guard_target(manager, on_unready="buffer")

    async def early_agent() -> list[bool]:
        return [await manager.send_to_thread("t1", {"type": kind}) for kind in AGENT_EVENTS]

    assert asyncio.run(early_agent()) == [True] * 4  # that loop is closed now
    assert guard.stats().pending == {"t1": 4}

    assert manager.update_connection_thread("u1", "t1") is True  # plain sync code

    assert [m["type"] for m in socket.received] == AGENT_EVENTS
    assert guard.stats().pending == {}
    assert recorded.types(Outcome.FLUSHED) == AGENT_EVENTS


def test_association_at_the_end_of_a_loop_still_delivers(
    guard_target: GuardTarget,
) -> None:
    manager = ReferenceManager()
    socket = manager.connect("u1")
    guard = guard_target(manager, on_unready="buffer")

    async def run() -> None:
        await manager.send_to_thread("t1", {"type": "a"})
        manager.update_connection_thread("u1", "t1")  # the loop ends right after

    asyncio.run(run())
    manager.update_connection_thread("u1", "t1")

    assert socket.received == [{"type": "a"}]
    assert guard.stats().pending == {}


def test_senders_cancelled_when_their_loop_closes_are_all_accounted_for(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    """Senders still waiting when their loop shuts down: every event is kept, in seq order."""
    manager = ReferenceManager()
    manager.connect("u1")
    guard = guard_target(manager)

    senders: list[asyncio.Task[bool]] = []

    async def fire_and_forget() -> None:
        for kind in AGENT_EVENTS:
            senders.append(asyncio.create_task(manager.send_to_thread("t1", {"type": kind})))
        await asyncio.sleep(0.01)  # every sender is waiting for the association

    asyncio.run(fire_and_forget())
    gc.collect()

    assert guard.stats().pending == {"t1": len(AGENT_EVENTS)}
    buffered = sorted(recorded.of(Outcome.BUFFERED), key=lambda r: r.seq)
    assert [
        r.event_type for r in buffered
    ] == AGENT_EVENTS  # cancelled in any order, kept in seq order


def test_sync_association_after_senders_died_with_their_loop_does_not_hang(
    guard_target: GuardTarget,
) -> None:
    """The line's holder died with its loop: a later sync association still flushes."""
    manager = ReferenceManager()
    socket = manager.connect("u1")
    guard = guard_target(manager)

    senders: list[asyncio.Task[bool]] = []

    async def fire_and_forget() -> None:
        for kind in AGENT_EVENTS[:2]:
            senders.append(asyncio.create_task(manager.send_to_thread("t1", {"type": kind})))
        await asyncio.sleep(0.01)

    asyncio.run(fire_and_forget())
    gc.collect()
    outcome: list[object] = []

    def associate() -> None:  # plain sync code: no event loop runs in this thread
        try:
            outcome.append(manager.update_connection_thread("u1", "t1"))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=associate, daemon=True)
    caller.start()
    caller.join(timeout=3.0)

    assert not caller.is_alive(), "update_connection_thread() never returned"
    assert outcome == [True]
    assert len(socket.received) + guard.stats().pending_total == 2


async def test_events_buffered_in_a_closed_loop_flush_in_a_new_running_loop(
    guard_target: GuardTarget,
) -> None:
    manager = ReferenceManager()
    socket = manager.connect("u1")
    guard = guard_target(manager, on_unready="buffer")

    def in_other_loop() -> None:
        asyncio.run(agent_run(manager, "t1"))

    await asyncio.to_thread(in_other_loop)  # a loop in another thread, closed afterwards
    assert guard.stats().pending == {"t1": 4}

    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0
    assert [m["type"] for m in socket.received] == AGENT_EVENTS


def test_sync_sends_from_a_closed_loop_flush_on_sync_association(
    guard_target: GuardTarget,
) -> None:
    manager = SyncReferenceManager()
    socket = manager.connect("u1")
    guard = guard_target(manager)

    async def early_agent() -> None:
        for kind in AGENT_EVENTS:
            manager.send_to_thread("t1", {"type": kind})

    asyncio.run(early_agent())
    manager.update_connection_thread("u1", "t1")

    assert [m["type"] for m in socket.received] == AGENT_EVENTS
    assert guard.stats().pending == {}
    assert emitguard.guarded(manager) is guard
