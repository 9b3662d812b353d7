"""How guarded methods are called: sync and async originals, renamed methods, where the
thread, message and owner arguments are, call forms, and preserved signatures."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

import emitguard
from emitguard import ConnectionState, Outcome
from emitguard.testing import ReferenceManager, SyncReferenceManager

if TYPE_CHECKING:
    from manager_support import GuardTarget, Recorder

pytest_plugins = ["manager_support"]


class AsyncAssociateManager:
    """Legacy manager with an async association and a sync send."""

    def __init__(self) -> None:
        self.threads: dict[str, str] = {}
        self.delivered: list[tuple[str, Any]] = []

    def send_to_thread(self, thread_id: str, message: Any) -> bool:
        if thread_id not in self.threads.values():
            return False
        self.delivered.append((thread_id, message))
        return True

    async def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        await asyncio.sleep(0)
        self.threads[user_id] = thread_id
        return True

    async def disconnect_user(self, user_id: str) -> None:
        await asyncio.sleep(0)
        self.threads.pop(user_id, None)


class RoomHub:
    """Legacy manager with its own names and argument order."""

    def __init__(self) -> None:
        self.members: dict[str, str] = {}
        self.sent: list[tuple[str, Any]] = []

    async def emit(self, payload: Any, room: str) -> bool:
        """Emit ``payload`` to ``room``."""
        if room not in self.members.values():
            return False
        self.sent.append((room, payload))
        return True

    def join(self, member: str, room: str) -> bool:
        """``member`` joins ``room``."""
        self.members[member] = room
        return True

    def leave(self, member: str) -> None:
        """``member`` leaves."""
        self.members.pop(member, None)


# -- sync and async originals -----------------------------------------------------------------


async def test_async_send_waits_for_sync_association(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    socket = manager.connect("u1")
    guard_target(manager)

    task = asyncio.create_task(manager.send_to_thread("t1", {"type": "agent_started"}))
    await asyncio.sleep(0.01)
    assert not task.done()  # held by the readiness barrier
    assert manager.update_connection_thread("u1", "t1") is True

    assert await task is True
    assert socket.received == [{"type": "agent_started"}]
    assert recorded.outcomes() == [Outcome.DELIVERED]
    assert recorded.emissions[0].waited > 0


async def test_sync_send_buffers_then_flushes_on_association(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = SyncReferenceManager()
    socket = manager.connect("u1")
    guard = guard_target(manager)

    assert manager.send_to_thread("t1", {"type": "a"}) is True  # never blocks the caller
    assert manager.send_to_thread("t1", {"type": "b"}) is True
    assert guard.stats().pending == {"t1": 2}
    assert manager.lost == 0

    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0

    assert socket.received == [{"type": "a"}, {"type": "b"}]
    assert recorded.outcomes() == [Outcome.BUFFERED] * 2 + [Outcome.FLUSHED] * 2
    assert manager.send_to_thread("t1", {"type": "c"}) is True
    assert socket.received[-1] == {"type": "c"}
    assert recorded.outcomes()[-1] is Outcome.DELIVERED


def test_sync_send_and_sync_association_without_any_event_loop(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = SyncReferenceManager()
    socket = manager.connect("u1")
    guard = guard_target(manager)

    assert manager.send_to_thread("t1", {"type": "a"}) is True
    manager.update_connection_thread("u1", "t1")  # flushes in a private loop

    assert socket.received == [{"type": "a"}]
    assert guard.stats().pending == {}
    assert recorded.outcomes() == [Outcome.BUFFERED, Outcome.FLUSHED]


async def test_async_association_and_disconnect_with_sync_send(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = AsyncAssociateManager()
    guard = guard_target(manager, disconnect="disconnect_user")

    assert manager.send_to_thread("t1", "early") is True
    assert await manager.update_connection_thread("u1", "t1") is True
    assert await guard.drain(timeout=1.0) == 0
    assert guard.state("t1") is ConnectionState.CONNECTED
    assert manager.delivered == [("t1", "early")]

    assert await manager.disconnect_user("u1") is None
    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert manager.send_to_thread("t1", "late") is True
    assert guard.stats().pending == {"t1": 1}
    assert recorded.outcomes() == [Outcome.BUFFERED, Outcome.FLUSHED, Outcome.BUFFERED]


async def test_async_association_wakes_waiting_async_send(guard_target: GuardTarget) -> None:
    class Manager(AsyncAssociateManager):
        async def send_to_thread(self, thread_id: str, message: Any) -> bool:  # type: ignore[override]
            return AsyncAssociateManager.send_to_thread(self, thread_id, message)

    manager = Manager()
    guard_target(manager)

    task = asyncio.create_task(manager.send_to_thread("t1", "hello"))
    await asyncio.sleep(0.01)
    await manager.update_connection_thread("u1", "t1")

    assert await task is True
    assert manager.delivered == [("t1", "hello")]


# -- renamed methods and argument positions -----------------------------------------------


async def test_renamed_methods_by_name(guard_target: GuardTarget, recorded: Recorder) -> None:
    hub = RoomHub()
    guard = guard_target(
        hub,
        send="emit",
        associate="join",
        disconnect="leave",
        thread_param="room",
        message_param="payload",
        owner_param="member",
    )

    task = asyncio.create_task(hub.emit({"type": "hello"}, "r1"))
    await asyncio.sleep(0.01)
    hub.join("alice", "r1")
    assert await task is True
    assert hub.sent == [("r1", {"type": "hello"})]

    hub.leave("alice")
    assert guard.state("r1") is ConnectionState.DISCONNECTED
    assert await hub.emit(payload={"type": "bye"}, room="r1") is True
    assert guard.stats().pending == {"r1": 1}
    assert [e.thread_id for e in recorded.emissions] == ["r1", "r1"]


async def test_thread_param_by_position_and_message_found_by_name(
    guard_target: GuardTarget,
) -> None:
    hub = RoomHub()
    # Position 1 is `room` in emit(payload, room) and in join(member, room).
    guard = guard_target(
        hub, send="emit", associate="join", thread_param=1, message_param="payload"
    )

    hub.join("alice", "r1")
    assert guard.state("r1") is ConnectionState.CONNECTED
    assert await hub.emit("hi", "r1") is True
    assert await hub.emit("kw", room="r1") is True
    assert hub.sent == [("r1", "hi"), ("r1", "kw")]


def test_message_before_thread_needs_message_param() -> None:
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(RoomHub(), send="emit", associate="join", thread_param="room")

    message = str(caught.value)
    assert "RoomHub instance.emit(payload, room)" in message
    assert "message_param=" in message


async def test_owner_param_names_the_owner_for_associate_and_disconnect(
    guard_target: GuardTarget,
) -> None:
    class Manager:
        def __init__(self) -> None:
            self.threads: dict[str, str] = {}

        async def send_to_thread(self, thread_id: str, message: Any) -> bool:
            return thread_id in self.threads.values()

        def update_connection_thread(self, thread_id: str, *, user: str) -> bool:
            self.threads[user] = thread_id
            return True

        def disconnect_user(self, reason: str, *, user: str) -> None:
            self.threads.pop(user, None)

    manager = Manager()
    guard = guard_target(manager, disconnect="disconnect_user", owner_param="user")

    manager.update_connection_thread("t1", user="alice")
    manager.update_connection_thread("t1", user="bob")
    manager.disconnect_user("timeout", user="alice")
    assert guard.state("t1") is ConnectionState.CONNECTED  # bob still carries it
    manager.disconnect_user("timeout", user="bob")
    assert guard.state("t1") is ConnectionState.DISCONNECTED


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: m.send_to_thread("t1", {"type": "x"}), id="positional"),
        pytest.param(
            lambda m: m.send_to_thread(thread_id="t1", message={"type": "x"}), id="keywords"
        ),
        pytest.param(
            lambda m: m.send_to_thread(message={"type": "x"}, thread_id="t1"), id="reordered"
        ),
        pytest.param(lambda m: m.send_to_thread("t1", message={"type": "x"}), id="mixed"),
        pytest.param(
            lambda m: type(m).send_to_thread(m, "t1", {"type": "x"}), id="unbound-positional"
        ),
        pytest.param(
            lambda m: type(m).send_to_thread(m, thread_id="t1", message={"type": "x"}),
            id="unbound-keywords",
        ),
    ],
)
async def test_call_forms_on_a_guarded_class(
    guard_target: GuardTarget, recorded: Recorder, call: Callable[[Any], Any]
) -> None:
    class Manager(ReferenceManager):
        pass

    guard_target(Manager, stamp_seq="seq")
    manager = Manager()
    socket = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")

    assert await call(manager) is True

    assert socket.received == [{"type": "x", "seq": 1}]
    assert [(e.thread_id, e.outcome) for e in recorded.emissions] == [("t1", Outcome.DELIVERED)]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: m.send_to_thread("t1", {"type": "x"}), id="positional"),
        pytest.param(
            lambda m: m.send_to_thread(thread_id="t1", message={"type": "x"}), id="keywords"
        ),
    ],
)
def test_call_forms_on_a_guarded_sync_instance(
    guard_target: GuardTarget, call: Callable[[Any], Any]
) -> None:
    manager = SyncReferenceManager()
    guard_target(manager, stamp_seq="seq")
    socket = manager.connect("u1")
    assert call(manager) is True  # buffered, then flushed on association
    manager.update_connection_thread(thread_id="t1", user_id="u1")

    assert call(manager) is True

    assert socket.received == [{"type": "x", "seq": 1}, {"type": "x", "seq": 2}]


async def test_keyword_only_and_positional_only_parameters(guard_target: GuardTarget) -> None:
    class Manager:
        def __init__(self) -> None:
            self.sent: list[tuple[str, Any]] = []
            self.ready: set[str] = set()

        async def send_to_thread(self, thread_id: str, /, *, message: Any) -> bool:
            self.sent.append((thread_id, message))
            return thread_id in self.ready

        def update_connection_thread(self, user_id: str, thread_id: str, /) -> bool:
            self.ready.add(thread_id)
            return True

    manager = Manager()
    guard = guard_target(manager, message_param="message", stamp_seq="seq")
    manager.update_connection_thread("u1", "t1")

    assert guard.state("t1") is ConnectionState.CONNECTED
    assert await manager.send_to_thread("t1", message={"n": 1}) is True
    assert manager.sent == [("t1", {"n": 1, "seq": 1})]


async def test_thread_and_message_found_in_var_keywords(guard_target: GuardTarget) -> None:
    class Manager:
        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []

        async def send_to_thread(self, **kwargs: Any) -> bool:
            self.sent.append(kwargs)
            return True

        def update_connection_thread(self, user_id: str, **kwargs: Any) -> bool:
            return True

    manager = Manager()
    guard = guard_target(manager, message_param="message", stamp_seq="seq")
    manager.update_connection_thread("u1", thread_id="t1")

    assert guard.state("t1") is ConnectionState.CONNECTED
    assert await manager.send_to_thread(thread_id="t1", message={"n": 1}, extra=2) is True
    assert manager.sent == [{"thread_id": "t1", "message": {"n": 1, "seq": 1}, "extra": 2}]


# -- signatures -----------------------------------------------------------------------------


@pytest.mark.parametrize("manager_class", [ReferenceManager, SyncReferenceManager, RoomHub])
def test_signatures_names_and_docs_are_preserved(
    guard_target: GuardTarget, manager_class: type[Any]
) -> None:
    names = (
        ("emit", "join", "leave")
        if manager_class is RoomHub
        else (
            "send_to_thread",
            "update_connection_thread",
            "disconnect_user",
        )
    )
    options = {"send": names[0], "associate": names[1], "disconnect": names[2]}
    if manager_class is RoomHub:
        options.update(thread_param="room", message_param="payload")
    instance = manager_class()
    before = {name: getattr(manager_class, name) for name in names}
    bound_before = {name: getattr(instance, name) for name in names}

    guard_target(manager_class, **options)

    for name in names:
        original, guarded = before[name], getattr(manager_class, name)
        assert guarded is not original
        assert inspect.signature(guarded) == inspect.signature(original)
        assert inspect.iscoroutinefunction(guarded) == inspect.iscoroutinefunction(original)
        assert guarded.__name__ == original.__name__
        assert guarded.__doc__ == original.__doc__
        bound = getattr(instance, name)
        assert inspect.signature(bound) == inspect.signature(bound_before[name])
        assert inspect.iscoroutinefunction(bound) == inspect.iscoroutinefunction(bound_before[name])


def test_instance_signatures_are_preserved(guard_target: GuardTarget) -> None:
    manager = AsyncAssociateManager()
    before = {
        name: getattr(manager, name)
        for name in ("send_to_thread", "update_connection_thread", "disconnect_user")
    }

    guard_target(manager, disconnect="disconnect_user")

    for name, original in before.items():
        guarded = getattr(manager, name)
        assert inspect.signature(guarded) == inspect.signature(original)
        assert inspect.iscoroutinefunction(guarded) == inspect.iscoroutinefunction(original)
        assert guarded.__name__ == name
    assert inspect.iscoroutinefunction(manager.update_connection_thread)
    assert not inspect.iscoroutinefunction(manager.send_to_thread)
