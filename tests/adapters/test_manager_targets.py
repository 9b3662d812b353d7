"""What ``emitguard.guard()`` can guard with the manager adapter, and how ``unguard()``
restores it: instances, classes, inherited methods and ``"package.module:Class"`` paths."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

import emitguard
from emitguard import ConnectionState, Outcome
from emitguard.testing import ReferenceManager
from emitguard_adapters.manager import GuardedMethod

if TYPE_CHECKING:
    from manager_support import GuardTarget, Recorder

pytest_plugins = ["manager_support"]

LEGACY_MODULE = """
from emitguard.testing import ReferenceManager


class Manager(ReferenceManager):
    \"\"\"A legacy manager defined in its own module.\"\"\"
"""


class CountingManager:
    """A small legacy manager that counts calls to its original methods."""

    def __init__(self) -> None:
        self.sends = 0
        self.associations = 0
        self.delivered: list[tuple[str, Any]] = []
        self.threads: set[str] = set()

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        """Send ``message`` to ``thread_id``."""
        self.sends += 1
        if thread_id not in self.threads:
            return False
        self.delivered.append((thread_id, message))
        return True

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        """Tie ``user_id`` to ``thread_id``."""
        self.associations += 1
        self.threads.add(thread_id)
        return True


def is_guarded(holder: object, name: str = "send_to_thread") -> bool:
    return isinstance(inspect.getattr_static(holder, name), GuardedMethod)


# -- instances ------------------------------------------------------------------------------


async def test_instance_target_guards_only_that_instance(guard_target: GuardTarget) -> None:
    manager, other = ReferenceManager(), ReferenceManager()
    guard = guard_target(manager, on_unready="buffer")

    assert is_guarded(manager)
    assert is_guarded(manager, "update_connection_thread")
    assert not is_guarded(other)
    assert not is_guarded(ReferenceManager)
    assert await manager.send_to_thread("t1", {"type": "a"}) is True  # buffered, not lost
    assert await other.send_to_thread("t1", {"type": "a"}) is False  # legacy behaviour
    assert guard.stats().pending == {"t1": 1}


async def test_unguard_instance_leaves_no_attribute_behind() -> None:
    manager = ReferenceManager()
    before = dict(vars(manager))
    emitguard.guard(manager)
    assert "send_to_thread" in vars(manager)

    assert emitguard.unguard(manager) is True

    assert vars(manager) == before
    assert not is_guarded(manager)
    assert emitguard.unguard(manager) is False
    assert emitguard.guarded(manager) is None


async def test_unguard_instance_restores_its_own_callable_attribute() -> None:
    manager = CountingManager()

    async def own_send(thread_id: str, message: Any) -> bool:
        return True

    manager.send_to_thread = own_send  # type: ignore[method-assign]
    emitguard.guard(manager)
    assert vars(manager)["send_to_thread"] is not own_send

    emitguard.unguard(manager)

    assert vars(manager)["send_to_thread"] is own_send
    assert "update_connection_thread" not in vars(manager)


async def test_guard_unguard_guard_instance_again(guard_target: GuardTarget) -> None:
    manager = ReferenceManager()
    first = emitguard.guard(manager)
    emitguard.unguard(manager)

    second = guard_target(manager)

    assert second is not first
    assert is_guarded(manager)
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    assert second.state("t1") is ConnectionState.CONNECTED
    assert first.state("t1") is ConnectionState.CONNECTING


# -- classes --------------------------------------------------------------------------------


async def test_class_target_guards_existing_and_future_instances(
    guard_target: GuardTarget,
) -> None:
    class Manager(ReferenceManager):
        pass

    existing = Manager()
    guard = guard_target(Manager, on_unready="buffer")
    future = Manager()

    assert await existing.send_to_thread("t1", {"type": "a"}) is True
    assert await future.send_to_thread("t2", {"type": "b"}) is True
    assert guard.stats().pending == {"t1": 1, "t2": 1}
    assert "send_to_thread" not in vars(existing)
    assert "send_to_thread" not in vars(future)


async def test_unguard_class_restores_every_instance() -> None:
    class Manager(ReferenceManager):
        pass

    existing = Manager()
    emitguard.guard(Manager, on_unready="buffer")
    future = Manager()
    emitguard.unguard(Manager)
    later = Manager()

    for manager in (existing, future, later):
        assert not is_guarded(manager)
        assert await manager.send_to_thread("t1", {"type": "a"}) is False  # legacy again
        assert manager.lost == 1


def test_unguard_class_restores_the_exact_own_functions() -> None:
    original_send = vars(CountingManager)["send_to_thread"]
    original_associate = vars(CountingManager)["update_connection_thread"]
    emitguard.guard(CountingManager)
    assert vars(CountingManager)["send_to_thread"] is not original_send

    assert emitguard.unguard(CountingManager) is True

    assert vars(CountingManager)["send_to_thread"] is original_send
    assert vars(CountingManager)["update_connection_thread"] is original_associate
    assert emitguard.unguard(CountingManager) is False


def test_unguard_subclass_deletes_the_wrapped_inherited_methods() -> None:
    class Base(CountingManager):
        pass

    class Sub(Base):
        pass

    emitguard.guard(Sub)
    assert "send_to_thread" in vars(Sub)
    assert "send_to_thread" not in vars(Base)

    emitguard.unguard(Sub)

    assert "send_to_thread" not in vars(Sub)
    assert "update_connection_thread" not in vars(Sub)
    assert Sub.send_to_thread is vars(CountingManager)["send_to_thread"]


async def test_inherited_methods_are_guarded_on_the_subclass_only(
    guard_target: GuardTarget,
) -> None:
    class Sub(CountingManager):
        pass

    guard = guard_target(Sub, on_unready="buffer")
    sub, base = Sub(), CountingManager()

    assert await sub.send_to_thread("t1", "hello") is True
    assert guard.stats().pending == {"t1": 1}
    assert sub.sends == 0  # the buffered send did not reach the original yet
    assert await base.send_to_thread("t1", "hello") is False
    assert base.sends == 1


def test_guard_unguard_guard_class_again(guard_target: GuardTarget) -> None:
    class Manager(CountingManager):
        pass

    first = emitguard.guard(Manager)
    emitguard.unguard(Manager)
    second = guard_target(Manager)

    assert second is not first
    assert is_guarded(Manager)
    Manager().update_connection_thread("u1", "t1")
    assert second.state("t1") is ConnectionState.CONNECTED


async def test_class_guard_works_for_slotted_instances(guard_target: GuardTarget) -> None:
    class Slotted:
        __slots__ = ("log",)

        def __init__(self) -> None:
            self.log: list[Any] = []

        async def send_to_thread(self, thread_id: str, message: Any) -> bool:
            self.log.append(message)
            return True

        def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
            return True

    guard = guard_target(Slotted)
    manager = Slotted()
    manager.update_connection_thread("u1", "t1")

    assert await manager.send_to_thread("t1", "hi") is True
    assert manager.log == ["hi"]
    assert guard.state("t1") is ConnectionState.CONNECTED


# -- idempotency ----------------------------------------------------------------------------


async def test_guarding_twice_with_same_options_returns_same_guard_and_wraps_once(
    guard_target: GuardTarget,
) -> None:
    manager = CountingManager()
    first = guard_target(manager, ready_timeout=0.5)
    wrapper = vars(manager)["send_to_thread"]

    second = guard_target(manager, ready_timeout=0.5)

    assert second is first
    assert vars(manager)["send_to_thread"] is wrapper
    manager.update_connection_thread("u1", "t1")
    assert await manager.send_to_thread("t1", "m") is True
    assert manager.sends == 1
    assert manager.associations == 1


async def test_guarding_class_twice_wraps_once(guard_target: GuardTarget) -> None:
    class Manager(CountingManager):
        pass

    assert guard_target(Manager) is guard_target(Manager)
    manager = Manager()
    manager.update_connection_thread("u1", "t1")

    assert await manager.send_to_thread("t1", "m") is True
    assert manager.sends == 1


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        ({"ready_timeout": 1.0}, {"ready_timeout": 2.5}, "ready_timeout"),
        ({}, {"on_unready": "buffer"}, "on_unready"),
        ({"disconnect": "disconnect_user"}, {}, "disconnect"),
        ({"thread_param": "thread_id"}, {"thread_param": 0}, "thread_param"),
    ],
)
def test_guarding_again_with_other_options_names_the_difference(
    guard_target: GuardTarget, first: dict[str, Any], second: dict[str, Any], named: str
) -> None:
    manager = ReferenceManager()
    guard_target(manager, **first)

    with pytest.raises(emitguard.AdapterError, match=rf"\({named} differ\)") as caught:
        emitguard.guard(manager, **second)

    assert "unguard" in str(caught.value)
    assert emitguard.guarded(manager) is not None


async def test_instance_of_guarded_class_gets_the_class_guard(guard_target: GuardTarget) -> None:
    class Manager(CountingManager):
        pass

    class_guard = guard_target(Manager)
    manager = Manager()

    assert guard_target(manager) is class_guard
    assert "send_to_thread" not in vars(manager)  # no second wrapper on the instance
    manager.update_connection_thread("u1", "t1")
    assert await manager.send_to_thread("t1", "m") is True
    assert manager.sends == 1


def test_instance_of_guarded_class_with_other_options_is_refused(
    guard_target: GuardTarget,
) -> None:
    class Manager(CountingManager):
        pass

    guard_target(Manager)

    with pytest.raises(emitguard.AdapterError, match="ready_timeout differ"):
        emitguard.guard(Manager(), ready_timeout=9.0)


def test_unguarding_the_instance_alias_leaves_the_class_guarded(
    guard_target: GuardTarget,
) -> None:
    class Manager(CountingManager):
        pass

    guard_target(Manager)
    manager = Manager()
    emitguard.guard(manager)

    assert emitguard.unguard(manager) is True
    assert is_guarded(Manager)


async def test_guard_after_class_unguard_guards_the_instance_again(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    """BUG: the instance's alias outlives the class guard in the registry."""

    class Manager(CountingManager):
        pass

    manager = Manager()
    emitguard.guard(Manager, on_unready="buffer")
    emitguard.guard(manager, on_unready="buffer")  # alias of the class guard
    emitguard.unguard(Manager)

    guard = guard_target(manager, on_unready="buffer")

    assert await manager.send_to_thread("t1", "early") is True  # must be buffered, not lost
    assert guard.stats().pending == {"t1": 1}
    assert recorded.outcomes() == [Outcome.BUFFERED]


async def test_subclass_of_guarded_class_shares_the_base_guard(
    guard_target: GuardTarget,
) -> None:
    class Base(CountingManager):
        pass

    class Sub(Base):
        pass

    base_guard = guard_target(Base)

    assert guard_target(Sub) is base_guard
    assert "send_to_thread" not in vars(Sub)


async def test_instance_guard_then_class_guard_does_not_double_wrap(
    guard_target: GuardTarget, recorded: Recorder
) -> None:
    class Manager(CountingManager):
        pass

    manager = Manager()
    instance_guard = guard_target(manager)
    class_guard = guard_target(Manager)
    assert class_guard is not instance_guard

    manager.update_connection_thread("u1", "t1")
    assert await manager.send_to_thread("t1", "m") is True

    assert manager.sends == 1
    assert [e.guard_name for e in recorded.emissions] == [instance_guard.name]


def test_unguard_leaves_a_method_replaced_after_guarding(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Manager(CountingManager):
        pass

    emitguard.guard(Manager)

    async def replacement(self: Any, thread_id: str, message: Any) -> bool:
        return True

    Manager.send_to_thread = replacement  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="emitguard.adapters.manager"):
        assert emitguard.unguard(Manager) is True

    assert vars(Manager)["send_to_thread"] is replacement
    assert "update_connection_thread" not in vars(Manager)
    assert any(
        "send_to_thread was replaced after emitguard wrapped it" in r.getMessage()
        for r in caplog.records
    )


def test_guard_names_the_guard_after_the_target(guard_target: GuardTarget) -> None:
    class Manager(CountingManager):
        pass

    first = guard_target(Manager).name
    assert first.rpartition("-")[0].endswith("Manager")
    name = guard_target(ReferenceManager()).name
    assert name.startswith("ReferenceManager-")
    assert guard_target(ReferenceManager()).name != name  # unique, for ledgers and metrics


# -- dotted paths ---------------------------------------------------------------------------


async def test_dotted_path_to_imported_module_guards_the_class(
    guard_target: GuardTarget, make_package: Callable[[str], str]
) -> None:
    module_name = make_package(LEGACY_MODULE)
    module = importlib.import_module(module_name)
    existing = module.Manager()

    guard = guard_target(f"{module_name}:Manager", on_unready="buffer")

    assert is_guarded(module.Manager)
    assert await existing.send_to_thread("t1", {"type": "a"}) is True
    assert guard.stats().pending == {"t1": 1}
    assert guard_target(module.Manager, on_unready="buffer") is guard


async def test_dotted_path_to_module_imported_later_guards_at_import(
    guard_target: GuardTarget, make_package: Callable[[str], str]
) -> None:
    module_name = make_package(LEGACY_MODULE)
    path = f"{module_name}:Manager"

    guard = guard_target(path, on_unready="buffer")
    module = importlib.import_module(module_name)

    assert is_guarded(module.Manager)
    manager = module.Manager()
    assert await manager.send_to_thread("t1", {"type": "a"}) is True
    assert guard.stats().pending == {"t1": 1}
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    assert await guard.drain(timeout=1.0) == 0
    assert manager.received("t1") == [{"type": "a"}]
    assert guard_target(path, on_unready="buffer") is guard


def test_unguard_dotted_path_restores_the_class(make_package: Callable[[str], str]) -> None:
    module_name = make_package(LEGACY_MODULE)
    module = importlib.import_module(module_name)
    emitguard.guard(f"{module_name}:Manager")

    assert emitguard.unguard(f"{module_name}:Manager") is True

    assert "send_to_thread" not in vars(module.Manager)
    assert emitguard.unguard(f"{module_name}:Manager") is False


def test_unguard_before_import_leaves_the_class_unpatched(
    make_package: Callable[[str], str],
) -> None:
    module_name = make_package(LEGACY_MODULE)
    emitguard.guard(f"{module_name}:Manager")
    assert emitguard.unguard(f"{module_name}:Manager") is True

    module = importlib.import_module(module_name)

    assert not is_guarded(module.Manager)
    assert "send_to_thread" not in vars(module.Manager)


def test_guard_unguard_guard_path_before_import_patches_once(
    guard_target: GuardTarget, make_package: Callable[[str], str]
) -> None:
    module_name = make_package(LEGACY_MODULE)
    path = f"{module_name}:Manager"
    first = emitguard.guard(path)
    emitguard.unguard(path)
    second = guard_target(path)

    module = importlib.import_module(module_name)

    wrapper = vars(module.Manager)["send_to_thread"]
    assert isinstance(wrapper, GuardedMethod)
    assert not isinstance(wrapper.__wrapped__, GuardedMethod)
    manager = module.Manager()
    manager.connect("u1")
    assert manager.update_connection_thread("u1", "t1") is True
    assert second.state("t1") is ConnectionState.CONNECTED
    assert first.state("t1") is ConnectionState.CONNECTING


def test_dotted_path_to_nested_class(
    guard_target: GuardTarget, make_package: Callable[[str], str]
) -> None:
    module_name = make_package(
        """
        from emitguard.testing import ReferenceManager


        class Outer:
            class Manager(ReferenceManager):
                pass
        """
    )
    module = importlib.import_module(module_name)

    guard_target(f"{module_name}:Outer.Manager")

    assert is_guarded(module.Outer.Manager)


def test_dotted_path_missing_class_at_later_import_is_logged(
    guard_target: GuardTarget,
    make_package: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    module_name = make_package(LEGACY_MODULE)
    guard_target(f"{module_name}:Missing")

    with caplog.at_level(logging.ERROR, logger="emitguard.adapters.manager"):
        module = importlib.import_module(module_name)  # the import itself succeeds

    assert not is_guarded(module.Manager)
    messages = [r.getMessage() for r in caplog.records if r.name == "emitguard.adapters.manager"]
    assert messages == [
        f"emitguard could not guard {module_name}:Missing when {module_name} was imported"
    ]


def test_dotted_path_to_imported_module_lacking_the_class(
    make_package: Callable[[str], str],
) -> None:
    module_name = make_package(LEGACY_MODULE)
    importlib.import_module(module_name)

    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(f"{module_name}:Nope")

    assert f"module {module_name!r} has no 'Nope'" in str(caught.value)
    assert emitguard.guarded(f"{module_name}:Nope") is None


@pytest.mark.parametrize("path", ["nocolon", "a.b:", ":C", "1bad:C", "a..b:C", "a:C.", "a b:C"])
def test_bad_dotted_path_is_refused(path: str) -> None:
    with pytest.raises(emitguard.AdapterError) as caught:
        emitguard.guard(path)

    message = str(caught.value)
    assert repr(path) in message
    assert "'package.module:ClassName'" in message
    assert emitguard.guarded(path) is None


def test_dotted_path_to_already_imported_module_lacking_the_method(
    make_package: Callable[[str], str],
) -> None:
    module_name = make_package("class Manager:\n    pass\n")
    module = importlib.import_module(module_name)

    with pytest.raises(emitguard.AdapterError, match="Manager has no method 'send_to_thread'"):
        emitguard.guard(f"{module_name}:Manager")

    assert vars(module.Manager).get("send_to_thread") is None


async def test_path_guard_and_class_guard_are_one_guard(
    guard_target: GuardTarget, make_package: Callable[[str], str]
) -> None:
    module_name = make_package(LEGACY_MODULE)
    module = importlib.import_module(module_name)
    class_guard = guard_target(module.Manager)

    assert guard_target(f"{module_name}:Manager") is class_guard
    assert asyncio.iscoroutinefunction(module.Manager.send_to_thread)
