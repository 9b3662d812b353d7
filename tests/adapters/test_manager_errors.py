"""Bad input to the manager adapter: clear errors at guard time, REJECTED recorded at send
time."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

import emitguard
from emitguard import Outcome
from emitguard.testing import ReferenceManager, SyncReferenceManager

if TYPE_CHECKING:
    from manager_support import GuardTarget, Recorder

pytest_plugins = ["manager_support"]


class SendOnly:
    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        return True


class AssociateOnly:
    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        return True


def untouched(target: object) -> bool:
    """No emitguard wrapper was left on the target or its class."""
    holders = [target] if isinstance(target, type) else [target, type(target)]
    return not any(
        type(value).__name__ == "GuardedMethod"
        for holder in holders
        for value in (vars(holder).values() if hasattr(holder, "__dict__") else ())
    )


# -- guard time: the target -------------------------------------------------------------------


def test_missing_send_method_names_it_and_the_option() -> None:
    target = AssociateOnly()
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(target)

    message = str(caught.value)
    assert "AssociateOnly instance has no method 'send_to_thread'" in message
    assert "send='<method name>'" in message
    assert untouched(target)
    assert emitguard.guarded(target) is None


def test_missing_renamed_send_method_names_it() -> None:
    with pytest.raises(emitguard.AdapterError, match=r"has no method 'emit'.*send="):
        emitguard.guard(ReferenceManager(), send="emit")


def test_missing_associate_method_names_it_and_the_option() -> None:
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(SendOnly)

    message = str(caught.value)
    assert "SendOnly has no method 'update_connection_thread'" in message
    assert "associate='<method name>'" in message
    assert "associate=None" in message
    assert untouched(SendOnly)


async def test_associate_none_guards_the_send_only(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    target = SendOnly()
    guard = guard_target(target, associate=None)
    guard.mark_connected("t1")

    assert await target.send_to_thread("t1", "hi") is True
    assert recorded.outcomes() == [Outcome.DELIVERED]


def test_missing_disconnect_method_names_it_and_leaves_nothing_patched() -> None:
    manager = ReferenceManager()
    with pytest.raises(emitguard.AdapterError, match=r"has no method 'drop_user'.*disconnect="):
        emitguard.guard(manager, disconnect="drop_user")

    assert vars(manager).get("send_to_thread") is None
    assert vars(manager).get("update_connection_thread") is None


def test_non_callable_attribute_is_refused() -> None:
    class Broken(AssociateOnly):
        send_to_thread = "not a method"

    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(Broken())

    message = str(caught.value)
    assert "send_to_thread is not a plain method (str)" in message
    assert "send=" in message


@pytest.mark.parametrize("kind", [staticmethod, classmethod])
def test_static_and_class_methods_are_refused(kind: Callable[[Any], Any]) -> None:
    def send_to_thread(*args: Any) -> bool:
        return True

    cls = type("Odd", (AssociateOnly,), {"send_to_thread": kind(send_to_thread)})

    for target in (cls, cls()):
        with pytest.raises(emitguard.AdapterError) as caught:
            emitguard.guard(target)
        assert f"send_to_thread is not a plain method ({kind.__name__})" in str(caught.value)
        assert untouched(target)


def test_property_is_refused_on_a_class_and_an_instance() -> None:
    class WithProperty(SendOnly):
        @property
        def update_connection_thread(self) -> Callable[..., bool]:
            return lambda user_id, thread_id: True

    for target in (WithProperty, WithProperty()):
        with pytest.raises(emitguard.AdapterError) as caught:
            emitguard.guard(target)
        assert "update_connection_thread is not a plain method (property)" in str(caught.value)
        assert "associate=" in str(caught.value)
        assert untouched(target)


def test_property_that_raises_is_refused_with_an_adapter_error() -> None:
    """BUG: on an instance, the property getter runs before the kind check."""

    class LazyProperty(SendOnly):
        @property
        def update_connection_thread(self) -> Callable[..., bool]:
            raise AttributeError("connection registry not initialised")

    with pytest.raises(emitguard.AdapterError, match="not a plain method \\(property\\)"):
        emitguard.guard(LazyProperty())


def test_instance_with_slots_is_refused_with_advice() -> None:
    class Slotted:
        __slots__ = ()

        async def send_to_thread(self, thread_id: str, message: Any) -> bool:
            return True

        def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
            return True

    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(Slotted())

    assert "Slotted instance has no __dict__ (uses __slots__?)" in str(caught.value)
    assert "guard its class instead" in str(caught.value)


def test_failure_halfway_through_patching_restores_what_was_patched() -> None:
    class Picky(ReferenceManager):
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "update_connection_thread":
                raise AttributeError("read-only attribute")
            super().__setattr__(name, value)

    manager = Picky()
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(manager)

    assert "Picky instance.update_connection_thread: read-only attribute" in str(caught.value)
    assert str(caught.value).startswith("cannot wrap ")
    assert "send_to_thread" not in vars(manager)
    assert emitguard.guarded(manager) is None


@pytest.mark.parametrize("target", [42, None, object()])
def test_objects_without_the_methods_are_refused(target: object) -> None:
    with pytest.raises(emitguard.AdapterError, match="has no method 'send_to_thread'"):
        emitguard.guard(target)


# -- guard time: the options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("send", 5),
        ("send", "not a name"),
        ("send", ""),
        ("associate", ["update_connection_thread"]),
        ("disconnect", "disconnect-user"),
    ],
)
def test_method_options_must_be_method_names(option: str, value: object) -> None:
    manager = ReferenceManager()
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(manager, **{option: value})

    assert str(caught.value) == f"{option} must be a method name, got {value!r}"
    assert untouched(manager)


def test_send_none_is_refused() -> None:
    with pytest.raises(emitguard.AdapterError, match="send must name the manager's send method"):
        emitguard.guard(ReferenceManager(), send=None)


def test_unknown_thread_param_lists_the_parameters() -> None:
    manager = ReferenceManager()
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(manager, thread_param="room")

    message = str(caught.value)
    assert "send_to_thread(thread_id, message) has no parameter 'room'" in message
    assert "thread_param=" in message
    assert untouched(manager)


def test_thread_param_missing_from_associate_lists_its_parameters() -> None:
    class Manager:
        async def send_to_thread(self, room: str, message: Any) -> bool:
            return True

        def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
            return True

    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(Manager, thread_param="room")

    assert "Manager.update_connection_thread(user_id, thread_id) has no parameter 'room'" in str(
        caught.value
    )


@pytest.mark.parametrize("position", [2, -1])
def test_thread_param_position_out_of_range(position: int) -> None:
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(ReferenceManager(), thread_param=position)

    message = str(caught.value)
    assert f"has no positional parameter {position}" in message
    assert "from 0 to 1" in message


@pytest.mark.parametrize("value", [True, 1.5, None])
def test_thread_param_must_be_a_name_or_a_position(value: object) -> None:
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(ReferenceManager(), thread_param=value)

    assert str(caught.value) == (
        f"thread_param must be a parameter name or a position, got {value!r}"
    )


def test_thread_param_aliases_must_name_something() -> None:
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(ReferenceManager(), thread_param=())

    assert str(caught.value) == (
        "thread_param must be a parameter name, a position or aliases (a tuple of names), got ()"
    )


def test_unknown_message_param_and_owner_param() -> None:
    with pytest.raises(emitguard.AdapterError, match=r"no parameter 'payload'.*message_param="):
        emitguard.guard(ReferenceManager(), message_param="payload")
    with pytest.raises(emitguard.AdapterError, match=r"no parameter 'user'.*owner_param="):
        emitguard.guard(ReferenceManager(), owner_param="user")


def test_disconnect_without_parameters_needs_an_owner() -> None:
    class Manager(SendOnly, AssociateOnly):
        def disconnect_all(self) -> None:
            pass

    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(Manager, disconnect="disconnect_all")

    assert "Manager.disconnect_all(no parameters) has no positional parameter 0" in str(
        caught.value
    )


def test_send_with_only_a_thread_parameter_cannot_find_the_message() -> None:
    class Manager(AssociateOnly):
        async def send_to_thread(self, thread_id: str) -> bool:
            return True

    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(Manager)

    assert "send_to_thread(thread_id) has no parameter to use; pass message_param=" in str(
        caught.value
    )


def test_unknown_guard_option_lists_the_valid_ones() -> None:
    manager = ReferenceManager()
    with pytest.raises(TypeError) as caught:
        emitguard.guard(manager, ready_timout=1.0)

    message = str(caught.value)
    assert "unknown guard option(s) 'ready_timout'" in message
    assert "ready_timeout" in message
    assert "on_unready" in message
    assert untouched(manager)
    assert emitguard.guarded(manager) is None


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("on_unready", "later", ValueError),
        ("ready_timeout", -1, ValueError),
        ("overflow", "explode", ValueError),
        ("max_per_thread", 0, ValueError),
        ("ttl", 0, ValueError),
        ("ready_timeout", "soon", TypeError),
        ("strict", "yes", TypeError),
    ],
)
def test_bad_guard_option_value_quotes_it(
    option: str, value: object, error: type[Exception]
) -> None:
    manager = ReferenceManager()
    with pytest.raises(error) as caught:
        emitguard.guard(manager, **{option: value})

    assert option in str(caught.value)
    assert repr(value) in str(caught.value)
    assert untouched(manager)


def test_bad_guard_option_on_a_dotted_path_is_raised_at_once() -> None:
    with pytest.raises(ValueError, match="'later'"):
        emitguard.guard("eg_never_imported_module:Manager", on_unready="later")
    assert emitguard.guarded("eg_never_imported_module:Manager") is None


def test_guard_name_option_is_accepted(guard_target: GuardTarget) -> None:
    """BUG: ``name`` is a Guard option, but the adapter passes its own name too."""
    guard = guard_target(ReferenceManager(), name="chat-manager")

    assert guard.name == "chat-manager"


# -- send time ---------------------------------------------------------------------------------


BAD_THREADS = [
    pytest.param(lambda send: send("", {"type": "x"}), "got an empty str", id="empty"),
    pytest.param(lambda send: send(True, {"type": "x"}), "not True", id="bool"),
    pytest.param(lambda send: send(["t"], {"type": "x"}), "unhashable list", id="unhashable"),
]


@pytest.mark.parametrize(("call", "reason"), BAD_THREADS)
async def test_bad_thread_id_is_rejected_by_async_send(
    guard_target: GuardTarget, recorded: Recorder, call: Callable[..., Any], reason: str
) -> None:
    manager = ReferenceManager()
    guard_target(manager)

    assert await call(manager.send_to_thread) is False

    assert recorded.outcomes() == [Outcome.REJECTED]
    record = recorded.emissions[0]
    assert "thread_id must be a hashable id" in (record.reason or "")
    assert reason in (record.reason or "")
    assert manager.lost == 0  # the original was not called


async def test_a_send_naming_no_thread_passes_through_unchanged(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager)

    assert await manager.send_to_thread(None, {"type": "x"}) is False  # the original's result
    with pytest.raises(TypeError, match="thread_id"):  # the original's own error
        await manager.send_to_thread(message={"type": "x"})  # type: ignore[call-arg]

    assert recorded.outcomes() == [Outcome.PASSED, Outcome.PASSED]
    assert recorded.emissions[0].thread_id is None
    assert manager.lost == 1  # the original was called, at once (no barrier)
    assert guard.stats().passed_through == 2


def test_a_sync_send_naming_no_thread_passes_through_unchanged(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = SyncReferenceManager()
    guard = guard_target(manager)

    assert manager.send_to_thread(None, {"type": "x"}) is False
    with pytest.raises(TypeError, match="thread_id"):
        manager.send_to_thread(message={"type": "x"})  # type: ignore[call-arg]

    assert recorded.outcomes() == [Outcome.PASSED, Outcome.PASSED]
    assert guard.stats().passed_through == 2


@pytest.mark.parametrize(("call", "reason"), BAD_THREADS)
def test_bad_thread_id_is_rejected_by_sync_send(
    guard_target: GuardTarget, recorded: Recorder, call: Callable[..., Any], reason: str
) -> None:
    manager = SyncReferenceManager()
    guard_target(manager)

    assert call(manager.send_to_thread) is False

    assert recorded.outcomes() == [Outcome.REJECTED]
    assert reason in (recorded.emissions[0].reason or "")


async def test_rejected_thread_is_recorded_by_its_repr(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    guard_target(manager)
    await manager.send_to_thread(True, {"type": "x"})

    assert recorded.emissions[0].thread_id == "True"
    assert recorded.emissions[0].seq == 0


async def test_int_thread_is_recorded_as_it_was_given(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    guard_target(manager, on_unready="buffer")
    await manager.send_to_thread(123, {"type": "x"})

    assert recorded.emissions[0].thread_id == 123
    assert recorded.outcomes() == [Outcome.BUFFERED]


async def test_none_message_is_rejected(guard_target: GuardTarget, recorded: Recorder) -> None:
    manager = ReferenceManager()
    guard_target(manager)
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")

    assert await manager.send_to_thread("t1", None) is False
    assert await manager.send_to_thread(thread_id="t1", message=None) is False

    assert recorded.outcomes() == [Outcome.REJECTED, Outcome.REJECTED]
    assert all(record.reason == "message is None" for record in recorded.emissions)
    assert manager.received("t1") == []


def test_none_message_is_rejected_by_sync_send(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = SyncReferenceManager()
    guard_target(manager)

    assert manager.send_to_thread("t1", None) is False
    assert recorded.emissions[0].reason == "message is None"


async def test_coroutine_message_is_rejected_while_buffering(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    async def make_event() -> dict[str, str]:
        return {"type": "x"}

    manager = ReferenceManager()
    guard = guard_target(manager, on_unready="buffer")
    coroutine = make_event()
    try:
        assert await manager.send_to_thread("t1", coroutine) is False
    finally:
        coroutine.close()

    assert recorded.outcomes() == [Outcome.REJECTED]
    assert "awaitable" in (recorded.emissions[0].reason or "")
    assert guard.stats().pending == {}


def test_coroutine_message_is_rejected_by_sync_send(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    async def make_event() -> dict[str, str]:
        return {"type": "x"}

    manager = SyncReferenceManager()
    guard_target(manager)
    coroutine = make_event()
    try:
        assert manager.send_to_thread("t1", coroutine) is False
    finally:
        coroutine.close()

    assert "was a coroutine passed instead of its result?" in (recorded.emissions[0].reason or "")


async def test_strict_mode_raises_emission_error_with_the_record(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    manager = ReferenceManager()
    guard_target(manager, strict=True)

    with pytest.raises(emitguard.EmissionError) as caught:
        await manager.send_to_thread("", {"type": "x"})

    assert caught.value.emission is recorded.emissions[0]
    assert caught.value.emission.outcome is Outcome.REJECTED
    assert "thread_id must be a hashable id" in str(caught.value)


def test_strict_mode_raises_from_sync_send(guard_target: GuardTarget) -> None:
    manager = SyncReferenceManager()
    guard_target(manager, strict=True)

    with pytest.raises(emitguard.EmissionError) as caught:
        manager.send_to_thread("t1", None)

    assert caught.value.emission.reason == "message is None"


async def test_strict_mode_does_not_raise_for_a_buffered_send(guard_target: GuardTarget) -> None:
    manager = ReferenceManager()
    guard = guard_target(manager, strict=True, on_unready="buffer")

    assert await manager.send_to_thread("t1", {"type": "x"}) is True
    assert guard.stats().pending == {"t1": 1}


def test_async_send_still_returns_a_coroutine(guard_target: GuardTarget) -> None:
    manager = ReferenceManager()
    guard_target(manager)
    pending = manager.send_to_thread("t1", {"type": "x"})
    try:
        assert inspect.iscoroutine(pending)
    finally:
        pending.close()
