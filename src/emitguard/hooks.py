"""pluggy in one place: markers, hook specifications and the process-wide plugin manager.

Listeners (the pytest plugin, metrics exporters, your own) implement hooks with
:data:`hookimpl` and are added with :func:`register`. Adapters implement
:func:`emitguard_adapt` and are found through the ``emitguard`` entry-point group; a plugin
that fails to load is logged and skipped.
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from emitguard import _live

if TYPE_CHECKING:
    from emitguard.records import Emission
    from emitguard.states import ConnectionState

Guard = Any
"""(The hooks' ``guard`` argument is an :class:`emitguard.Guard`; the engine imports this
module, so this one names the type without importing it.)"""

__all__ = [
    "ENTRY_POINT_GROUP",
    "hookimpl",
    "hookspec",
    "load_entry_points",
    "plugin_manager",
    "register",
    "unregister",
]

PROJECT = "emitguard"
ENTRY_POINT_GROUP = "emitguard"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

log = logging.getLogger("emitguard")


class HookSpecs:
    """The hooks emitguard calls. Implementations may take any subset of the arguments."""

    @hookspec
    def emitguard_emission(self, emission: Emission, guard: Guard) -> None:
        """Called with every emission record, in the order the guard records them."""

    @hookspec
    def emitguard_state_changed(
        self, guard: Guard, thread_id: str, old: ConnectionState, new: ConnectionState
    ) -> None:
        """Called when a thread moves from state ``old`` to state ``new``."""

    @hookspec(firstresult=True)
    def emitguard_adapt(self, target: Any, options: dict[str, Any]) -> Any:
        """Return an adapted target (an object with ``guard`` and ``unguard()``) for a target
        this plugin recognises, or ``None`` to let the next plugin try."""

    @hookspec
    def emitguard_guard_created(self, guard: Guard) -> None:
        """Called when a :class:`~emitguard.Guard` is constructed."""

    @hookspec
    def emitguard_add_commands(self, commands: Any) -> None:
        """Add sub-commands to the ``emitguard`` command line. ``commands`` is the argparse
        sub-parsers object; give each new parser a ``run`` default, a callable taking the
        parsed arguments and returning the exit code: ``parser.set_defaults(run=...)``."""


class _Dispatch:
    """Process-wide plugin manager plus a cheap "is anyone listening" flag for hot paths."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(HookSpecs)
        self.listening = False
        self.listeners: list[tuple[Any, tuple[str, ...]]] | None = []
        self.loaded = False

    def refresh(self) -> None:
        impls = self.pm.hook.emitguard_emission.get_hookimpls()
        self.listening = bool(impls)
        # The emission hook runs for every observed send: call plain listeners directly, in
        # pluggy's order (last registered first), unless one is a wrapper (then pluggy does).
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            self.listeners = None
        else:
            self.listeners = [(impl.function, tuple(impl.argnames)) for impl in reversed(impls)]
        for guard in _live.guards():
            guard.refresh()


_dispatch = _Dispatch()


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry-point plugins loaded."""
    load_entry_points()
    return _dispatch.pm


BUILT_IN = {
    "manager": "emitguard_adapters.manager",
    "channels": "emitguard_adapters._channels_layer",
    "commands": "emitguard_adapters.commands",
}
"""The adapters shipped with emitguard, by entry-point name: registered from a source
checkout too, where no package metadata declares them."""


def load_entry_points() -> list[str]:
    """Load plugins of the ``emitguard`` entry-point group once (and the built-in adapters,
    which a source checkout without package metadata does not declare); return the names
    loaded.

    A plugin that fails to import or register is logged with its traceback and skipped.
    """
    if _dispatch.loaded:
        return []
    _dispatch.loaded = True
    loaded: list[str] = []
    declared = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    for entry_point in declared:
        if _dispatch.pm.has_plugin(entry_point.name):
            continue
        try:
            _dispatch.pm.register(entry_point.load(), name=entry_point.name)
        except Exception:
            log.exception(
                "emitguard plugin %r (%s) failed to load; skipped",
                entry_point.name,
                entry_point.value,
            )
            continue
        loaded.append(entry_point.name)
    names = {entry_point.name for entry_point in declared}
    for name, module in BUILT_IN.items():
        if name in names or _dispatch.pm.has_plugin(name):
            continue
        try:
            _dispatch.pm.register(importlib.import_module(module), name=name)
        except ImportError:  # a distribution without the adapters package
            continue
        loaded.append(name)
    _dispatch.refresh()
    return loaded


def listening() -> bool:
    """Whether any plugin implements ``emitguard_emission`` (cheap: a flag)."""
    return _dispatch.listening


def register(plugin: object, name: str | None = None) -> str | None:
    """Add a listener or adapter plugin; returns its name (``None`` if pluggy refused it)."""
    registered = _dispatch.pm.register(plugin, name=name)
    _dispatch.refresh()
    return registered


def unregister(plugin: object | None = None, name: str | None = None) -> object | None:
    """Remove a plugin added with :func:`register` (by object or by name)."""
    removed = _dispatch.pm.unregister(plugin, name=name)
    _dispatch.refresh()
    return removed


def emitted(emission: Emission, guard: Guard) -> None:
    """Call ``emitguard_emission`` listeners; a failing one is logged, never raised."""
    listeners = _dispatch.listeners
    if listeners is None:
        call_safely("emitguard_emission", emission=emission, guard=guard)
        return
    for function, argnames in listeners:
        try:
            if argnames == ("emission",):
                function(emission)
            else:
                given = {"emission": emission, "guard": guard}
                function(*(given[name] for name in argnames))
        except Exception:
            log.exception(
                "emitguard listener failed in emitguard_emission; the emission is unaffected"
            )


def call_safely(hook_name: str, **kwargs: Any) -> None:
    """Call a listener hook; a failing listener is logged, never raised into the host."""
    try:
        getattr(_dispatch.pm.hook, hook_name)(**kwargs)
    except Exception:
        log.exception("emitguard listener failed in %s; the emission is unaffected", hook_name)
