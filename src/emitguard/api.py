"""``guard()`` and ``unguard()``: find the adapter for a target through the plugin hooks."""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

from emitguard import hooks
from emitguard.engine import Guard
from emitguard.errors import AdapterError

__all__ = ["Adapted", "check_same_options", "guard", "guarded", "unguard"]


@runtime_checkable
class Adapted(Protocol):
    """What an adapter's ``emitguard_adapt`` returns for a target it recognises."""

    @property
    def guard(self) -> Guard:
        """The guard the adapter routes the target's calls through."""

    def unguard(self) -> None:
        """Restore the target exactly as it was."""


class _Registry:
    """Targets guarded in this process: one adapted record per target identity."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.by_key: dict[object, tuple[object, Adapted, dict[str, Any]]] = {}
        self.primary: dict[int, Adapted] = {}
        """The first adapted record of each guard (by the guard's id): the one that patched."""

    @staticmethod
    def key(target: object) -> object:
        return target if isinstance(target, str) else ("id", id(target))


_registry = _Registry()


def guard(target: object, **options: Any) -> Guard:
    """Guard ``target`` and return its :class:`Guard`.

    ``target`` is whatever an installed adapter recognises; the built-in manager adapter takes
    a manager instance, a manager class (every instance, present and future) or a dotted path
    ``"package.module:ClassName"``. Options are the adapter's (``send=``, ``associate=``, ...)
    plus every :class:`Guard` option. Guarding the same target again with the same options
    returns the same guard; with different options it raises :class:`AdapterError`.
    """
    key = _registry.key(target)
    with _registry.lock:
        known = _registry.by_key.get(key)
        if known is not None:
            return _same(target, known[1], known[2], options)
        adapted = hooks.plugin_manager().hook.emitguard_adapt(target=target, options=options)
        if adapted is None:
            raise AdapterError(
                f"no emitguard adapter recognises {target!r}; installed adapters: "
                f"{', '.join(sorted(_adapters())) or 'none'}"
            )
        if not isinstance(adapted, Adapted):
            raise AdapterError(f"adapter returned {adapted!r}, which has no guard and unguard()")
        _registry.by_key[key] = (target, adapted, dict(options))
        _registry.primary.setdefault(id(adapted.guard), adapted)
        return adapted.guard


def unguard(target: object) -> bool:
    """Restore a guarded target exactly; False when it was not guarded (nothing changes)."""
    with _registry.lock:
        known = _registry.by_key.pop(_registry.key(target), None)
        if known is None:
            return False
        guard_of = known[1].guard
        if _registry.primary.get(id(guard_of)) is not known[1] and any(
            adapted.guard is guard_of for _, adapted, _ in _registry.by_key.values()
        ):
            return True  # an alias (e.g. an instance of a guarded class): forget it only
        known[1].unguard()
        _registry.primary.pop(id(guard_of), None)
        # Targets that reached the same guard by another route (an instance of a guarded
        # class, the class of a guarded dotted path) are no longer guarded either.
        for key, (_, adapted, _) in list(_registry.by_key.items()):
            if adapted.guard is guard_of:
                del _registry.by_key[key]
    return True


def guarded(target: object) -> Guard | None:
    """The guard of a target guarded with :func:`guard`, or ``None``."""
    known = _registry.by_key.get(_registry.key(target))
    return known[1].guard if known is not None else None


def _same(target: object, adapted: Adapted, before: dict[str, Any], now: dict[str, Any]) -> Guard:
    check_same_options(target, before, now)
    return adapted.guard


def check_same_options(target: object, before: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise :class:`AdapterError` naming the options that differ, if any do."""
    if before != now:
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        raise AdapterError(
            f"{target!r} is already guarded with other options ({', '.join(changed)} differ); "
            "call emitguard.unguard() first"
        )


def _adapters() -> list[str]:
    pm = hooks.plugin_manager()
    return [
        pm.get_name(impl.plugin) or repr(impl.plugin)
        for impl in pm.hook.emitguard_adapt.get_hookimpls()
    ]
