"""Guarded sends with nobody listening and no seq stamping: the hot path that calls the
original straight away when the thread is connected and idle.

The other test modules register a record listener, which turns the hot path off; these tests
check the same contract through ``guard.stats()`` and the manager's own state instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from emitguard import ConnectionState, Outcome
from emitguard.testing import ReferenceManager

if TYPE_CHECKING:
    from manager_support import GuardTarget

pytest_plugins = ["manager_support"]


class YieldingManager:
    """Legacy manager whose send yields to the loop, like a real socket write."""

    def __init__(self) -> None:
        self.delivered: list[Any] = []
        self.ready: set[str] = set()
        self.fail_next = 0

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("write failed")
        if thread_id not in self.ready:
            return False
        self.delivered.append(message)
        return True

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        self.ready.add(thread_id)
        return True


class RoomHub:
    """Thread after the message, under other names."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.rooms: set[str] = set()

    async def emit(self, payload: Any, room: str, *, volatile: bool = False) -> bool:
        if room not in self.rooms:
            return False
        self.sent.append((room, payload))
        return True

    def join(self, member: str, room: str) -> bool:
        self.rooms.add(room)
        return True


def delivered(stats: Any) -> int:
    return int(stats.outcomes[Outcome.DELIVERED])


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m, t, x: m.send_to_thread(t, x), id="positional"),
        pytest.param(lambda m, t, x: m.send_to_thread(thread_id=t, message=x), id="keywords"),
        pytest.param(lambda m, t, x: m.send_to_thread(t, message=x), id="mixed"),
        pytest.param(lambda m, t, x: type(m).send_to_thread(m, t, x), id="unbound"),
    ],
)
async def test_connected_sends_go_straight_through(
    guard_target: GuardTarget, call: Callable[..., Any]
) -> None:
    class Manager(ReferenceManager):
        pass

    guard = guard_target(Manager)
    manager = Manager()
    socket = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")

    results = [await call(manager, "t1", {"n": n}) for n in range(3)]

    assert results == [True, True, True]
    assert socket.received == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert delivered(guard.stats()) == 3
    assert guard.stats().pending == {}


async def test_thread_after_message_and_keyword_only_extra(guard_target: GuardTarget) -> None:
    hub = RoomHub()
    guard = guard_target(
        hub, send="emit", associate="join", thread_param="room", message_param="payload"
    )
    hub.join("alice", "r1")

    assert await hub.emit("a", "r1") is True
    assert await hub.emit("b", "r1", volatile=True) is True
    assert await hub.emit(payload="c", room="r1") is True
    assert await hub.emit("d", room="r1") is True

    assert hub.sent == [("r1", "a"), ("r1", "b"), ("r1", "c"), ("r1", "d")]
    assert delivered(guard.stats()) == 4


async def test_hot_path_failure_buffers_and_recovers(guard_target: GuardTarget) -> None:
    manager = YieldingManager()
    guard = guard_target(manager, retry_backoff=())
    manager.update_connection_thread("u1", "t1")
    manager.fail_next = 1

    assert await manager.send_to_thread("t1", "a") is True  # raised: buffered
    assert await manager.send_to_thread("t1", "b") is True  # behind it
    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert guard.stats().pending == {"t1": 2}

    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0
    assert manager.delivered == ["a", "b"]
    stats = guard.stats()
    assert stats.outcomes[Outcome.FLUSHED] == 2
    assert delivered(stats) == 0


async def test_hot_path_send_returning_false_buffers(guard_target: GuardTarget) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager, retry_backoff=())
    socket = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    manager.drop_connection(socket.connection_id)

    assert await manager.send_to_thread("t1", {"type": "a"}) is True

    assert guard.stats().pending == {"t1": 1}
    assert guard.state("t1") is ConnectionState.DISCONNECTED


async def test_concurrent_sends_keep_call_order(guard_target: GuardTarget) -> None:
    manager = YieldingManager()
    guard = guard_target(manager)
    manager.update_connection_thread("u1", "t1")

    results = await asyncio.gather(*(manager.send_to_thread("t1", n) for n in range(20)))

    assert results == [True] * 20
    assert manager.delivered == list(range(20))
    assert delivered(guard.stats()) == 20


async def test_concurrent_sends_with_a_failure_keep_call_order(
    guard_target: GuardTarget,
) -> None:
    manager = YieldingManager()
    guard = guard_target(manager)
    manager.update_connection_thread("u1", "t1")
    manager.fail_next = 1

    results = await asyncio.gather(*(manager.send_to_thread("t1", n) for n in range(5)))
    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0

    assert results == [True] * 5
    assert manager.delivered == list(range(5))


@pytest.mark.parametrize(
    ("thread_id", "message"),
    [(True, "m"), ("", "m"), (["t1"], "m"), ("t1", None)],
    ids=["bool", "empty", "unhashable", "no-message"],
)
async def test_bad_input_on_a_connected_manager_is_rejected(
    guard_target: GuardTarget, thread_id: Any, message: Any
) -> None:
    manager = YieldingManager()
    guard = guard_target(manager)
    manager.update_connection_thread("u1", "t1")

    assert await manager.send_to_thread(thread_id, message) is False

    assert guard.stats().outcomes[Outcome.REJECTED] == 1
    assert manager.delivered == []


async def test_missing_message_is_rejected(guard_target: GuardTarget) -> None:
    manager = YieldingManager()
    guard = guard_target(manager)
    manager.update_connection_thread("u1", "t1")

    assert await manager.send_to_thread("t1") is False  # type: ignore[call-arg]

    assert guard.stats().outcomes[Outcome.REJECTED] == 1


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: m.send_to_thread("t1", {"n": 1}), id="positional"),
        pytest.param(lambda m: m.send_to_thread(thread_id="t1", message={"n": 1}), id="keywords"),
    ],
)
async def test_none_returning_original_with_seq_stamp(
    guard_target: GuardTarget, is_async: bool, call: Callable[[Any], Any]
) -> None:
    sent: list[Any] = []

    class AsyncManager:
        async def send_to_thread(self, thread_id: str, message: Any) -> None:
            sent.append((thread_id, message))

        def update_connection_thread(self, user_id: str, thread_id: str) -> None:
            pass

    class SyncManager(AsyncManager):
        def send_to_thread(self, thread_id: str, message: Any) -> None:  # type: ignore[override]
            sent.append((thread_id, message))

    manager = AsyncManager() if is_async else SyncManager()
    guard = guard_target(manager, stamp_seq="seq")
    manager.update_connection_thread("u1", "t1")

    result = call(manager)
    if is_async:
        result = await result

    assert result is True
    assert sent == [("t1", {"n": 1, "seq": 1})]
    assert delivered(guard.stats()) == 1


async def test_none_returning_original_buffers_with_its_arguments(
    guard_target: GuardTarget,
) -> None:
    sent: list[Any] = []

    class Manager:
        async def send_to_thread(self, thread_id: str, message: Any, *, urgent: bool) -> None:
            sent.append((thread_id, message, urgent))

        def update_connection_thread(self, user_id: str, thread_id: str) -> None:
            pass

    manager = Manager()
    guard = guard_target(manager, on_unready="buffer", stamp_seq="seq")

    assert await manager.send_to_thread("t1", {"n": 1}, urgent=True) is True
    assert await manager.send_to_thread(thread_id="t1", message={"n": 2}, urgent=False) is True
    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0

    assert sent == [("t1", {"n": 1, "seq": 1}, True), ("t1", {"n": 2, "seq": 2}, False)]


async def test_exception_that_is_not_a_connection_failure_does_not_block_the_thread(
    guard_target: GuardTarget,
) -> None:
    """BUG: a message the original can never send (here: not JSON serialisable, so
    ``json.dumps`` raises TypeError like ``websocket.send_json``) is buffered as if the
    connection had failed, and then blocks every later event of the thread."""

    class JsonManager(ReferenceManager):
        async def send_to_thread(self, thread_id: str, message: Any) -> bool:
            json.dumps(message)
            return await super().send_to_thread(thread_id, message)

    manager = JsonManager()
    guard = guard_target(manager)
    socket = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")

    await manager.send_to_thread("t1", {"type": "bad", "payload": {1, 2}})
    assert await manager.send_to_thread("t1", {"type": "good"}) is True
    manager.update_connection_thread("u1", "t1")
    await guard.drain(timeout=0.5)

    assert socket.received == [{"type": "good"}]
