"""pluggy wiring: listeners, entry-point plugins (a broken one is skipped), adapter lookup."""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

import pytest

import emitguard
from emitguard import AdapterError, Guard, hooks


class FakeEntryPoint:
    def __init__(self, name: str, value: str, plugin: Any = None, error: Exception | None = None):
        self.name, self.value, self._plugin, self._error = name, value, plugin, error

    def load(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._plugin


def test_builtin_adapter_is_loaded_through_the_entry_point_group() -> None:
    names = [ep.name for ep in metadata.entry_points(group="emitguard")]
    assert "manager" in names
    pm = hooks.plugin_manager()
    assert pm.has_plugin("manager")
    assert pm.has_plugin("channels")  # the channel layers' (tried first, mostly "not mine")
    adapters = [impl.plugin_name for impl in pm.hook.emitguard_adapt.get_hookimpls()]
    assert sorted(adapters) == ["channels", "manager"]


def test_broken_entry_point_plugin_is_logged_and_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Good:
        @emitguard.hookimpl
        def emitguard_guard_created(self, guard: Guard) -> None:
            created.append(guard)

    created: list[Guard] = []
    fakes = [
        FakeEntryPoint("broken", "nowhere:plugin", error=ImportError("no module named nowhere")),
        FakeEntryPoint("good", "tests:good", plugin=Good()),
    ]
    monkeypatch.setattr(hooks._dispatch, "loaded", False)
    monkeypatch.setattr(hooks.metadata, "entry_points", lambda group: fakes)
    with caplog.at_level(logging.ERROR, logger="emitguard"):
        loaded = hooks.load_entry_points()
    try:
        assert loaded == ["good"]
        assert "emitguard plugin 'broken' (nowhere:plugin) failed to load; skipped" in caplog.text
        guard = Guard()
        assert created == [guard]
    finally:
        hooks.unregister(name="good")
    assert hooks.load_entry_points() == []  # once per process


def test_register_refreshes_the_hot_path_flag() -> None:
    class Listener:
        @emitguard.hookimpl
        def emitguard_emission(self, emission: emitguard.Emission) -> None:
            pass

    guard = Guard()
    assert guard._pipeline.fast is guard._table.slots
    listener = Listener()
    emitguard.register(listener)
    try:
        assert guard._pipeline.fast == {}
    finally:
        emitguard.unregister(listener)
    assert guard._pipeline.fast is guard._table.slots
    assert Guard(stamp_seq="seq")._pipeline.fast == {}


def test_third_party_adapter_wins_before_the_manager_adapter() -> None:
    class Widget:
        pass

    class Adapted:
        def __init__(self) -> None:
            self.guard = Guard()
            self.undone = False

        def unguard(self) -> None:
            self.undone = True

    adapted = Adapted()

    class WidgetAdapter:
        @emitguard.hookimpl
        def emitguard_adapt(self, target: Any, options: dict[str, Any]) -> Any:
            return adapted if isinstance(target, Widget) else None

    plugin = WidgetAdapter()
    emitguard.register(plugin)
    try:
        widget = Widget()
        assert emitguard.guard(widget) is adapted.guard
        assert emitguard.guarded(widget) is adapted.guard
        assert emitguard.unguard(widget) is True
        assert adapted.undone
        with pytest.raises(AdapterError, match="has no method 'send_to_thread'"):
            emitguard.guard(object())
    finally:
        emitguard.unregister(plugin)


def test_adapter_returning_garbage_is_refused() -> None:
    class Liar:
        @emitguard.hookimpl(tryfirst=True)
        def emitguard_adapt(self, target: Any, options: dict[str, Any]) -> Any:
            return "not adapted" if target == "liar:Target" else None

    plugin = Liar()
    emitguard.register(plugin)
    try:
        with pytest.raises(AdapterError, match="has no guard and unguard"):
            emitguard.guard("liar:Target")
    finally:
        emitguard.unregister(plugin)


def test_no_adapter_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    built_in = {name: hooks.plugin_manager().get_plugin(name) for name in ("manager", "channels")}
    for plugin in built_in.values():
        hooks.unregister(plugin)
    try:
        with pytest.raises(AdapterError, match=r"no emitguard adapter recognises .* none"):
            emitguard.guard(object())
    finally:
        for name, plugin in built_in.items():
            hooks.register(plugin, name=name)
