"""The manager adapter on managers shaped like real ones: ids of any hashable type, thread
parameters per role with aliases, the event type in an argument of its own, broadcasts that
pass through, greetings sent from inside the association call, a verdict for sends that
swallow a closed socket, the leave role, owner mismatches refused, warnings once per thread."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest

import emitguard
from emitguard import ConnectionState, Outcome

if TYPE_CHECKING:
    from manager_support import GuardTarget, Recorder

pytest_plugins = ["manager_support"]


class RoomServer:
    """A python-socketio-like server: ``emit(event, data, to=None, room=None)`` (no room: a
    broadcast), ``enter_room(sid, room)``, ``leave_room(sid, room)``, ``disconnect(sid)``."""

    def __init__(self) -> None:
        self.rooms: dict[Any, set[str]] = {}
        self.inbox: dict[str, list[tuple[str, Any]]] = {}

    def connect(self, sid: str) -> None:
        self.inbox[sid] = []

    async def emit(
        self, event: str, data: Any = None, to: Any = None, room: Any = None, skip_sid: Any = None
    ) -> None:
        target = to if to is not None else room
        sids = set(self.inbox) if target is None else set(self.rooms.get(target, ()))
        for sid in sorted(sids - {skip_sid}):
            self.inbox[sid].append((event, data))

    def enter_room(self, sid: str, room: Any) -> None:
        self.rooms.setdefault(room, set()).add(sid)

    def leave_room(self, sid: str, room: Any) -> None:
        self.rooms.get(room, set()).discard(sid)

    def disconnect(self, sid: str) -> None:
        for members in self.rooms.values():
            members.discard(sid)
        self.inbox.pop(sid, None)


ROOM_ROLES: dict[str, Any] = {
    "send": "emit",
    "associate": "enter_room",
    "leave": "leave_room",
    "disconnect": "disconnect",
    "thread_param": {"send": ("to", "room"), "associate": "room"},
    "event_type": "event",
}


async def test_thread_param_per_role_with_aliases(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    server = RoomServer()
    guard = guard_target(server, **ROOM_ROLES, ready_timeout=1.0)
    server.connect("sid-1")

    early = asyncio.create_task(server.emit("token", {"n": 1}, to="r1"))
    await asyncio.sleep(0.01)
    server.enter_room("sid-1", "r1")  # wakes the waiting emit
    await early
    await server.emit("token", {"n": 2}, room="r1")
    await server.emit("done", to="r1")  # no data: the message is MISSING, still a send

    assert server.inbox["sid-1"] == [("token", {"n": 1}), ("token", {"n": 2}), ("done", None)]
    assert [(r.thread_id, r.event_type, r.outcome) for r in recorded.emissions][:2] == [
        ("r1", "token", Outcome.DELIVERED),
        ("r1", "token", Outcome.DELIVERED),
    ]
    assert guard.state("r1") is ConnectionState.CONNECTED


async def test_a_broadcast_passes_through_at_once(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    server = RoomServer()
    guard = guard_target(server, **ROOM_ROLES)
    server.connect("sid-1")
    server.connect("sid-2")

    started = time.monotonic()
    assert await server.emit("hello", {"all": True}) is None  # the original's own result
    assert await server.emit("hi", {"all": True}, to=None, skip_sid="sid-2") is None

    assert time.monotonic() - started < 0.05  # no barrier
    assert server.inbox["sid-1"] == [("hello", {"all": True}), ("hi", {"all": True})]
    assert server.inbox["sid-2"] == [("hello", {"all": True})]
    assert [(r.outcome, r.thread_id, r.event_type, r.seq) for r in recorded.emissions] == [
        (Outcome.PASSED, None, "hello", 0),
        (Outcome.PASSED, None, "hi", 0),
    ]
    stats = guard.stats()
    assert stats.passed_through == 2
    assert stats.pending_total == 0


async def test_event_type_argument_feeds_protect(guard_target: GuardTarget) -> None:
    server = RoomServer()
    guard = guard_target(
        server, **ROOM_ROLES, on_unready="buffer", max_per_thread=2, protect={"done"}
    )
    await server.emit("done", {"n": 0}, to="r1")
    for n in range(1, 4):
        await server.emit("token", {"n": n}, to="r1")
    entries = await guard.pending("r1")
    assert [(e.event_type, e.message) for e in entries] == [("done", {"n": 0}), ("token", {"n": 3})]


async def test_event_type_callable_reads_the_message(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    class Manager:
        async def send_to_thread(self, thread_id: str, message: dict[str, Any]) -> bool:
            return True

        def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
            return True

    manager = Manager()
    guard_target(manager, event_type=lambda message: message["kind"])
    manager.update_connection_thread("u", "t")
    await manager.send_to_thread("t", {"kind": "agent_thinking"})
    assert recorded.emissions[-1].event_type == "agent_thinking"


@pytest.mark.parametrize(
    "thread_id", [7, uuid.UUID(int=3), ("/chat", "r1")], ids=["int", "uuid", "namespace-room"]
)
async def test_thread_ids_of_any_hashable_type(
    guard_target: GuardTarget, recorded: Recorder, thread_id: Any
) -> None:
    server = RoomServer()
    guard_target(server, **ROOM_ROLES, ready_timeout=1.0)
    server.connect("sid-1")
    waiting = asyncio.create_task(server.emit("token", "x", to=thread_id))
    await asyncio.sleep(0.01)
    server.enter_room("sid-1", thread_id)
    await waiting
    assert server.inbox["sid-1"] == [("token", "x")]
    assert recorded.emissions[-1].thread_id == thread_id
    assert type(recorded.emissions[-1].thread_id) is type(thread_id)


async def test_leave_disconnects_one_thread_only_when_no_other_owner_carries_it(
    guard_target: GuardTarget,
) -> None:
    server = RoomServer()
    guard = guard_target(server, **ROOM_ROLES)
    for sid in ("a", "b"):
        server.connect(sid)
    server.enter_room("a", "r1")
    server.enter_room("a", "r2")
    server.enter_room("b", "r1")

    server.leave_room("a", "r1")
    assert guard.state("r1") is ConnectionState.CONNECTED  # b still carries it
    server.leave_room("b", "r1")
    assert guard.state("r1") is ConnectionState.DISCONNECTED
    assert guard.state("r2") is ConnectionState.CONNECTED  # a left r1 only

    assert await server.emit("token", 1, to="r1") is True  # buffered, not lost
    server.enter_room("a", "r1")
    assert await guard.drain(1.0) == 0
    assert server.inbox["a"][-1] == ("token", 1)


def test_guard_leave_is_an_engine_call() -> None:
    guard = emitguard.Guard()
    guard.mark_connected("t", owner="u1")
    guard.mark_connected("t", owner="u2")
    assert guard.leave("t", "u1") is False
    assert guard.leave("t", "u3") is False  # never carried it
    assert guard.leave("t", "u2", reason="left the room") is True
    assert guard.state("t") is ConnectionState.DISCONNECTED
    assert guard.leave("unknown", "u1") is False


def test_owner_mismatch_between_associate_and_disconnect_is_refused() -> None:
    class Manager:
        async def send_to_thread(self, thread_id: str, message: Any) -> bool:
            return True

        def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
            return True

        def disconnect(self, connection_id: str) -> None:
            pass

    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(Manager(), disconnect="disconnect")
    message = str(caught.value)
    assert "Manager instance.disconnect(connection_id) takes its owner from 'connection_id'" in (
        message
    )
    assert "update_connection_thread(user_id, thread_id) records owners from 'user_id'" in message
    assert "owner_param={'associate': '<parameter>', 'disconnect': '<parameter>'}" in message

    manager = Manager()  # named explicitly: the user says they hold the same value
    emitguard.guard(manager, disconnect="disconnect", owner_param={"disconnect": "connection_id"})
    emitguard.unguard(manager)


def test_per_role_options_name_known_roles() -> None:
    with pytest.raises(
        emitguard.AdapterError, match=r"thread_param names unknown role\(s\) 'emit'"
    ):
        emitguard.guard(RoomServer(), **{**ROOM_ROLES, "thread_param": {"emit": "to"}})


def test_errors_list_the_methods_real_parameters() -> None:
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(RoomServer(), **{**ROOM_ROLES, "thread_param": {"send": "target"}})
    assert (
        "RoomServer instance.emit(event, data, to, room, skip_sid) has no parameter 'target'"
        in (str(caught.value))
    )


class GreetingManager:
    """AutoGen Studio's shape: ``connect(websocket, run_id)`` sends a "connected" message
    itself; the send swallows a closed socket and returns ``None``."""

    def __init__(self) -> None:
        self.sockets: dict[int, list[Any]] = {}
        self.closed: set[int] = set()

    async def connect(self, websocket: list[Any], run_id: int) -> None:
        self.sockets[run_id] = websocket
        await self.send_message(run_id, {"type": "system", "status": "connected"})

    async def send_message(self, run_id: int, message: dict[str, Any]) -> bool | None:
        socket = self.sockets.get(run_id)
        if socket is None or run_id in self.closed:
            return None  # swallowed: a closed or missing socket
        socket.append(message)
        return True

    def disconnect(self, websocket: list[Any]) -> None:
        for run_id, socket in list(self.sockets.items()):
            if socket is websocket:
                del self.sockets[run_id]


GREETING_ROLES: dict[str, Any] = {
    "send": "send_message",
    "associate": "connect",
    "disconnect": "disconnect",
    "thread_param": "run_id",
    "verdict": "none_is_failure",
}


async def test_a_greeting_from_inside_the_association_does_not_wait(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = GreetingManager()
    guard = guard_target(manager, **GREETING_ROLES)
    early = asyncio.create_task(manager.send_message(7, {"type": "agent_started"}))
    await asyncio.sleep(0.01)  # parked on the barrier, holding the line
    socket: list[Any] = []

    started = time.monotonic()
    await manager.connect(socket, 7)
    assert time.monotonic() - started < 0.05
    assert await early is True
    assert await guard.drain(1.0) == 0

    assert [m["type"] for m in socket] == ["system", "agent_started"]
    greeting = next(r for r in recorded.emissions if r.event_type == "system")
    assert (greeting.outcome, greeting.seq) == (Outcome.DELIVERED, 0)


async def test_verdict_none_is_failure_keeps_events_a_closed_socket_swallowed(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = GreetingManager()
    guard = guard_target(manager, **GREETING_ROLES, retry_backoff=())
    first: list[Any] = []
    await manager.connect(first, 1)
    manager.closed.add(1)  # the socket died; the send swallows it and returns None

    assert await manager.send_message(1, {"type": "token", "n": 1}) is True  # kept
    assert guard.state(1) is ConnectionState.DISCONNECTED
    manager.closed.discard(1)
    second: list[Any] = []
    await manager.connect(second, 1)
    assert await guard.drain(1.0) == 0
    assert [m.get("n") for m in second] == [None, 1]  # the greeting, then the kept event
    assert Outcome.FLUSHED in recorded.outcomes()


@pytest.mark.parametrize(
    ("verdict", "delivered"), [(None, True), ("none_is_failure", False), (bool, False)]
)
async def test_verdict_option(verdict: Any, delivered: bool) -> None:
    guard = emitguard.Guard(verdict=verdict, retry_backoff=())
    guard.mark_connected("t")

    async def swallowing(message: Any) -> None:
        return None

    await guard.send("t", {"type": "x"}, swallowing)
    assert (guard.state("t") is ConnectionState.CONNECTED) is delivered


def test_verdict_option_is_checked() -> None:
    with pytest.raises(ValueError, match="verdict must be None, 'none_is_failure' or a callable"):
        emitguard.Guard(verdict="none")


async def test_a_raising_verdict_is_logged_and_taken_as_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def verdict(result: Any) -> bool:
        raise RuntimeError("broken verdict")

    guard = emitguard.Guard(verdict=verdict)
    guard.mark_connected("t")
    with caplog.at_level(logging.WARNING, logger="emitguard"):
        assert await guard.send("t", {"type": "x"}, _delivered) is True
    assert "verdict" in caplog.text


async def _delivered(message: Any) -> bool:
    return True


async def test_rejected_sends_are_logged_once_per_thread(caplog: pytest.LogCaptureFixture) -> None:
    guard = emitguard.Guard()
    guard.mark_connected("t")
    with caplog.at_level(logging.WARNING, logger="emitguard"):
        for _ in range(3):
            await guard.send("t", None, _delivered)
        await guard.send("", {"type": "x"}, _delivered)
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert lines == [
        "emitguard rejected thread t seq 0 message: REJECTED (message is None)",
        "emitguard rejected thread '' seq 0 x: REJECTED (thread_id must be a hashable id "
        "(str, int, UUID, tuple, ...), got an empty str)",
    ]


async def test_events_buffered_past_half_their_ttl_are_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = emitguard.Guard(on_unready="buffer", ttl=0.2)
    with caplog.at_level(logging.WARNING, logger="emitguard"):
        for n in range(3):
            await guard.send("t", {"type": "token", "n": n}, _delivered)
        await asyncio.sleep(0.16)
    stale = [r.getMessage() for r in caplog.records if "of ttl=" in r.getMessage()]
    assert len(stale) == 1
    assert "3 event(s) buffered for 't'" in stale[0]
    assert "thread connecting" in stale[0]
    await guard.aclose()
