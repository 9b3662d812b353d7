"""The ``emitguard_faults`` fixture: deterministic faults, undone at teardown."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from emitguard import ConnectionState, Guard
from emitguard.testing import ReferenceManager, SyncReferenceManager
from pytest_emitguard._faults import Faults
from pytest_emitguard._ledger import EmissionLedger

pytest_plugins = ["pytester"]

EVENTS = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]

GuardFactory = Callable[..., Guard]


async def agent_run(manager: ReferenceManager, user: str, thread_id: str) -> None:
    """The report's flow: associate, then emit at once."""
    assert manager.update_connection_thread(user, thread_id) is True
    for kind in EVENTS:
        await manager.send_to_thread(thread_id, {"type": kind})


def types(messages: list[Any]) -> list[str]:
    return [m["type"] for m in messages]


# ------------------------------------------------------------------ delay_association


async def test_delayed_association_loses_events_unguarded(
    emitguard_manager: ReferenceManager, emitguard_faults: Faults
) -> None:
    emitguard_manager.connect("u1")
    delayed = emitguard_faults.delay_association(emitguard_manager, 0.05)
    await agent_run(emitguard_manager, "u1", "t1")
    assert delayed.calls == 1
    assert delayed.pending == 1
    await asyncio.sleep(0.1)
    assert delayed.completed == 1
    assert delayed.results == [True]
    assert emitguard_manager.lost > 0
    assert emitguard_manager.received("t1") == []


async def test_delayed_association_guarded_delivers_all_in_order(
    emitguard_manager: ReferenceManager,
    emitguard_guard: GuardFactory,
    emitguard_faults: Faults,
    emitguard_emissions: EmissionLedger,
) -> None:
    emitguard_manager.connect("u1")
    guard = emitguard_guard(emitguard_manager)
    delayed = emitguard_faults.delay_association(emitguard_manager, 0.05)
    await agent_run(emitguard_manager, "u1", "t1")
    assert delayed.completed == 1
    assert guard.state("t1") is ConnectionState.CONNECTED
    emitguard_emissions.assert_delivered(*EVENTS, thread="t1")
    assert emitguard_manager.lost == 0
    assert types(emitguard_manager.received("t1")) == EVENTS


async def test_delay_of_an_async_association_schedules_a_task(
    emitguard_faults: Faults,
) -> None:
    class AsyncAssociation(ReferenceManager):
        async def associate(self, user_id: str, thread_id: str) -> bool:
            return self.update_connection_thread(user_id, thread_id)

    manager = AsyncAssociation()
    manager.connect("u1")
    delayed = emitguard_faults.delay_association(manager, 0.02, method="associate")
    assert inspect.iscoroutinefunction(manager.associate)
    assert await manager.associate("u1", "t1") is True
    assert manager.threads_of("u1") == set()
    await asyncio.sleep(0.06)
    assert manager.threads_of("u1") == {"t1"}
    assert delayed.results == [True]


async def test_undo_cancels_delayed_calls(
    emitguard_manager: ReferenceManager, emitguard_faults: Faults
) -> None:
    emitguard_manager.connect("u1")
    emitguard_faults.delay_association(emitguard_manager, 0.02)
    emitguard_manager.update_connection_thread("u1", "t1")
    emitguard_faults.undo()
    await asyncio.sleep(0.05)
    assert emitguard_manager.threads_of("u1") == set()


# ------------------------------------------------------------------ drop_after


async def test_drop_after_then_reassociation_flushes_in_order(
    emitguard_manager: ReferenceManager,
    emitguard_guard: GuardFactory,
    emitguard_faults: Faults,
    emitguard_emissions: EmissionLedger,
) -> None:
    manager = emitguard_manager
    manager.connect("u1")
    guard = emitguard_guard(manager, retry_backoff=())
    manager.update_connection_thread("u1", "t1")
    drop = emitguard_faults.drop_after(manager, "t1", 2)
    for kind in EVENTS[:4]:
        await manager.send_to_thread("t1", {"type": kind})
    assert (drop.delivered, drop.refused, drop.dropped) == (2, 1, True)
    assert guard.state("t1") is ConnectionState.DISCONNECTED
    assert types(manager.received("t1")) == EVENTS[:2]
    manager.update_connection_thread("u1", "t1")  # re-association ends the drop
    assert not drop.dropped
    await manager.send_to_thread("t1", {"type": EVENTS[4]})
    assert await guard.drain(2.0) == 0
    emitguard_emissions.assert_delivered(*EVENTS, thread="t1")
    assert types(manager.received("t1")) == EVENTS


async def test_drop_after_calls_disconnect(
    emitguard_manager: ReferenceManager,
    emitguard_guard: GuardFactory,
    emitguard_faults: Faults,
    emitguard_emissions: EmissionLedger,
) -> None:
    manager = emitguard_manager
    first = manager.connect("u1")
    guard = emitguard_guard(manager, disconnect="disconnect_user")
    manager.update_connection_thread("u1", "t1")
    drop = emitguard_faults.drop_after(
        manager, "t1", 1, disconnect="disconnect_user", disconnect_args=("u1",)
    )
    for kind in EVENTS[:3]:
        await manager.send_to_thread("t1", {"type": kind})
    assert first.closed
    assert drop.drops == 1
    assert guard.state("t1") is ConnectionState.DISCONNECTED
    second = manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(2.0) == 0
    assert types(first.received) == EVENTS[:1]
    assert types(second.received) == EVENTS[1:3]
    emitguard_emissions.assert_delivered(*EVENTS[:3], thread="t1")


async def test_drop_after_leaves_other_threads_alone(
    emitguard_manager: ReferenceManager, emitguard_faults: Faults
) -> None:
    emitguard_manager.connect("u1")
    emitguard_manager.connect("u2")
    emitguard_manager.update_connection_thread("u1", "t1")
    emitguard_manager.update_connection_thread("u2", "t2")
    drop = emitguard_faults.drop_after(emitguard_manager, "t1", 1, associate=None)
    assert await emitguard_manager.send_to_thread("t1", {"type": "a"}) is True
    assert await emitguard_manager.send_to_thread("t1", {"type": "b"}) is False
    assert await emitguard_manager.send_to_thread("t2", {"type": "c"}) is True
    drop.reconnect()
    assert await emitguard_manager.send_to_thread("t1", {"type": "d"}) is True
    assert types(emitguard_manager.received("t1")) == ["a", "d"]


# ------------------------------------------------------------------ fail_sends


async def test_fail_every_second_send_guarded_delivers_all_after_drain(
    emitguard_manager: ReferenceManager,
    emitguard_guard: GuardFactory,
    emitguard_faults: Faults,
    emitguard_emissions: EmissionLedger,
) -> None:
    manager = emitguard_manager
    manager.connect("u1")
    guard = emitguard_guard(manager)
    manager.update_connection_thread("u1", "t1")
    failing = emitguard_faults.fail_sends(manager, every=2)
    for kind in EVENTS:
        await manager.send_to_thread("t1", {"type": kind})
    assert failing.failed_calls == [2]
    for _ in range(20):
        if not guard.stats().pending_total:
            break
        manager.update_connection_thread("u1", "t1")
        await guard.drain(1.0)
    assert guard.stats().pending_total == 0
    assert failing.failures >= 2
    assert failing.failed_calls == list(range(2, failing.calls + 1, 2))
    emitguard_emissions.assert_delivered(*EVENTS, thread="t1")
    emitguard_emissions.assert_no_duplicates()
    assert types(manager.received("t1")) == EVENTS


def test_fail_sends_raises_the_given_error(emitguard_faults: Faults) -> None:
    manager = SyncReferenceManager()
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    failing = emitguard_faults.fail_sends(manager, every=1, error=ConnectionError)
    assert not inspect.iscoroutinefunction(manager.send_to_thread)
    with pytest.raises(ConnectionError, match="injected send failure"):
        manager.send_to_thread("t1", {"type": "a"})
    assert failing.failures == 1
    assert manager.received("t1") == []


async def _failed_calls(faults: Faults, seed: int) -> list[int]:
    manager = ReferenceManager()
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    failing = faults.fail_sends(manager, rate=0.3, seed=seed)
    results = [await manager.send_to_thread("t1", {"n": i}) for i in range(60)]
    assert [i + 1 for i, ok in enumerate(results) if not ok] == failing.failed_calls
    return failing.failed_calls


async def test_fail_sends_at_a_seeded_rate_is_deterministic(emitguard_faults: Faults) -> None:
    first = await _failed_calls(emitguard_faults, seed=7)
    second = await _failed_calls(emitguard_faults, seed=7)
    other = await _failed_calls(emitguard_faults, seed=8)
    assert first == second
    assert 0 < len(first) < 60
    assert other != first


# ------------------------------------------------------------------ raise_on_association


async def test_raise_on_association_marks_error_then_recovers(
    emitguard_manager: ReferenceManager,
    emitguard_guard: GuardFactory,
    emitguard_faults: Faults,
    emitguard_emissions: EmissionLedger,
) -> None:
    manager = emitguard_manager
    manager.connect("u1")
    guard = emitguard_guard(manager)
    raising = emitguard_faults.raise_on_association(manager, ConnectionError("boom"))
    with pytest.raises(ConnectionError, match="boom"):
        manager.update_connection_thread("u1", "t1")
    assert guard.state("t1") is ConnectionState.ERROR
    await manager.send_to_thread("t1", {"type": "agent_started"})
    assert manager.received("t1") == []
    assert manager.update_connection_thread("u1", "t1") is True
    assert guard.state("t1") is ConnectionState.CONNECTED
    assert await guard.drain(2.0) == 0
    assert (raising.calls, raising.raised, raising.remaining) == (2, 1, 0)
    emitguard_emissions.assert_delivered("agent_started", thread="t1")


# ------------------------------------------------------------------ undo


def _apply_all(faults: Faults, manager: ReferenceManager) -> None:
    faults.fail_sends(manager, every=3)
    faults.drop_after(manager, "t1", 1)
    faults.raise_on_association(manager, RuntimeError, times=2)
    faults.delay_association(manager, 1.0)


def test_undo_restores_the_exact_guarded_attributes(
    emitguard_manager: ReferenceManager, emitguard_guard: GuardFactory
) -> None:
    emitguard_guard(emitguard_manager)
    names = ("send_to_thread", "update_connection_thread")
    proxies = {name: vars(emitguard_manager)[name] for name in names}
    inner = {name: proxies[name].__wrapped__ for name in names}
    faults = Faults()
    _apply_all(faults, emitguard_manager)
    assert vars(emitguard_manager)["update_connection_thread"] is not proxies[names[1]]
    assert proxies["send_to_thread"].__wrapped__ is not inner["send_to_thread"]
    assert inspect.iscoroutinefunction(proxies["send_to_thread"].__wrapped__)
    faults.undo()
    faults.undo()  # twice is harmless
    for name in names:
        assert vars(emitguard_manager)[name] is proxies[name]
        assert proxies[name].__wrapped__ is inner[name]


def test_undo_restores_the_exact_unguarded_attributes() -> None:
    manager = ReferenceManager()

    async def own_send(thread_id: str, message: Any) -> bool:
        return True

    manager.send_to_thread = own_send  # type: ignore[method-assign]
    faults = Faults()
    _apply_all(faults, manager)
    assert vars(manager)["send_to_thread"] is not own_send
    faults.undo()
    assert vars(manager)["send_to_thread"] is own_send
    assert "update_connection_thread" not in vars(manager)


# ------------------------------------------------------------------ arguments


BAD: list[tuple[str, Callable[[Faults, ReferenceManager], object], str]] = [
    ("every+rate", lambda f, m: f.fail_sends(m, every=2, rate=0.5), "exactly one of every="),
    ("neither", lambda f, m: f.fail_sends(m), "exactly one of every="),
    ("every=0", lambda f, m: f.fail_sends(m, every=0), "every must be an int >= 1"),
    ("rate>1", lambda f, m: f.fail_sends(m, rate=1.5), "rate must be a number from 0 to 1"),
    ("seed", lambda f, m: f.fail_sends(m, every=1, seed="x"), "seed must be an int"),  # type: ignore[arg-type]
    ("error", lambda f, m: f.fail_sends(m, every=1, error=42), "error must be an exception"),  # type: ignore[arg-type]
    ("send", lambda f, m: f.fail_sends(m, every=1, send="nope"), "has no method 'nope'"),
    ("seconds", lambda f, m: f.delay_association(m, -1), "seconds must be a number >= 0"),
    ("method", lambda f, m: f.delay_association(m, 1, method="no pe"), "method must be"),
    ("n", lambda f, m: f.drop_after(m, "t1", -1), "n must be an int >= 0"),
    ("thread_id", lambda f, m: f.drop_after(m, "", 1), "thread_id must be"),
    ("disconnect", lambda f, m: f.drop_after(m, "t1", 1, disconnect="gone"), "disconnect:"),
    ("times", lambda f, m: f.raise_on_association(m, ValueError, times=0), "times must be"),
    ("no error", lambda f, m: f.raise_on_association(m, None), "error must be"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("call", "message"), [(c, m) for _, c, m in BAD], ids=[i for i, *_ in BAD])
def test_bad_arguments_raise_value_error(
    call: Callable[[Faults, ReferenceManager], object], message: str
) -> None:
    manager = ReferenceManager()
    faults = Faults()
    with pytest.raises(ValueError, match=message):
        call(faults, manager)
    assert vars(manager).keys() == vars(ReferenceManager()).keys()
    faults.undo()


# ------------------------------------------------------------------ teardown


def test_a_failing_test_still_gets_its_target_restored(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_broken="""
        import emitguard
        from emitguard.testing import SyncReferenceManager

        MANAGER = SyncReferenceManager()
        MANAGER.connect("u1")
        MANAGER.update_connection_thread("u1", "t1")


        def test_breaks_the_target(emitguard_faults):
            emitguard_faults.fail_sends(MANAGER, every=1)
            emitguard_faults.raise_on_association(MANAGER, RuntimeError, times=5)
            assert MANAGER.send_to_thread("t1", {"type": "a"}) is False
            assert False, "the test fails with its faults in place"


        def test_next_test_sees_the_original(emitguard_guard):
            assert "send_to_thread" not in vars(MANAGER)
            assert "update_connection_thread" not in vars(MANAGER)
            assert MANAGER.update_connection_thread("u1", "t1") is True
            assert MANAGER.send_to_thread("t1", {"type": "b"}) is True
            assert [m["type"] for m in MANAGER.received("t1")] == ["b"]
        """
    )
    result = pytester.runpytest("-o", "asyncio_default_fixture_loop_scope=function")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*the test fails with its faults in place*"])


# ------------------------------------------------------------------ finding the thread


class AgentHub:
    """A manager whose thread argument is not ``thread_id``: ``emit(event, data, room)``."""

    def __init__(self) -> None:
        self.rooms: dict[str, set[str]] = {}
        self.sent: list[tuple[str, str, Any]] = []

    def join(self, sid: str, room: str) -> bool:
        self.rooms.setdefault(room, set()).add(sid)
        return True

    async def emit(self, event: str, data: Any, room: str) -> bool:
        if not self.rooms.get(room):
            return False
        self.sent.append((room, event, data))
        return True


HUB_ROLES = {"send": "emit", "associate": "join", "message_param": "data"}


async def test_drop_after_finds_the_thread_the_way_the_guard_does(
    emitguard_guard: GuardFactory, emitguard_faults: Faults
) -> None:
    hub = AgentHub()
    guard = emitguard_guard(hub, thread_param="room", retry_backoff=(), **HUB_ROLES)
    hub.join("sid-1", "r1")
    drop = emitguard_faults.drop_after(hub, "r1", 1, send="emit", associate="join")
    await hub.emit("agent_started", {}, "r1")
    await hub.emit("agent_thinking", {}, room="r1")
    assert (drop.delivered, drop.refused, drop.dropped) == (1, 1, True)
    assert guard.state("r1") is ConnectionState.DISCONNECTED
    hub.join("sid-1", "r1")  # the association below the guard ends the drop
    assert not drop.dropped
    assert await guard.drain(2.0) == 0
    assert [event for _, event, _ in hub.sent] == ["agent_started", "agent_thinking"]


@pytest.mark.parametrize(
    ("thread_param", "associate"), [("room", "join"), (2, None)], ids=["by-name", "by-position"]
)
async def test_drop_after_unguarded_takes_thread_param(
    emitguard_faults: Faults, thread_param: str | int, associate: str | None
) -> None:
    hub = AgentHub()
    hub.join("sid-1", "r1")
    drop = emitguard_faults.drop_after(
        hub, "r1", 1, send="emit", associate=associate, thread_param=thread_param
    )
    assert await hub.emit("a", {}, "r1") is True
    assert await hub.emit("b", {}, room="r1") is False
    assert await hub.emit("c", {}, "r2") is False  # another room: not refused by the fault
    assert (drop.delivered, drop.refused) == (1, 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"send": "emit", "associate": None},
            r"drop_after: AgentHub instance\.emit\(event, data, room\) has no parameter "
            r"'thread_id'; pass thread_param= to name it",
        ),
        (
            {"send": "emit", "associate": "join", "thread_param": "thread"},
            r"drop_after: AgentHub instance\.emit\(event, data, room\) has no parameter 'thread'",
        ),
        (
            {"send": "emit", "associate": "join", "thread_param": 5},
            r"drop_after: AgentHub instance\.emit\(event, data, room\) has no positional "
            r"parameter 5",
        ),
    ],
    ids=["default-name", "wrong-name", "wrong-position"],
)
def test_drop_after_refuses_when_it_cannot_find_the_thread(
    emitguard_faults: Faults, options: dict[str, Any], message: str
) -> None:
    hub = AgentHub()
    with pytest.raises(ValueError, match=message):
        emitguard_faults.drop_after(hub, "r1", 1, **options)
    assert "emit" not in vars(hub)  # nothing was installed


def test_drop_after_refuses_an_association_without_the_thread(
    emitguard_guard: GuardFactory, emitguard_faults: Faults
) -> None:
    class Hub(AgentHub):
        def enter(self, sid: str) -> bool:
            return True

    hub = Hub()
    emitguard_guard(hub, thread_param="room", **HUB_ROLES)
    with pytest.raises(ValueError, match=r"Hub instance\.enter\(sid\) has no parameter 'room'"):
        emitguard_faults.drop_after(hub, "r1", 1, send="emit", associate="enter")


async def test_fail_sends_also_fails_flushes(
    emitguard_manager: ReferenceManager,
    emitguard_guard: GuardFactory,
    emitguard_faults: Faults,
    emitguard_emissions: EmissionLedger,
) -> None:
    """Documented: the fault counts the guard's own flush calls of the original too."""
    manager = emitguard_manager
    manager.connect("u1")
    guard = emitguard_guard(manager, on_unready="buffer")
    failing = emitguard_faults.fail_sends(manager, every=2)
    for kind in EVENTS[:3]:
        await manager.send_to_thread("t1", {"type": kind})  # buffered: not a call yet
    assert failing.calls == 0
    for _ in range(20):
        manager.update_connection_thread("u1", "t1")  # flushes the outbox
        if not await guard.drain(0.5):
            break
    assert 2 in failing.failed_calls  # the second flushed event failed once
    assert failing.calls >= 4  # three flushes and at least one retry
    emitguard_emissions.assert_delivered(*EVENTS[:3], thread="t1")
    assert types(manager.received("t1")) == EVENTS[:3]
