"""Guard a legacy connection manager in place, with wrapt.

``emitguard.guard(manager)`` wraps three methods of a manager instance, of a manager class
(every instance, present and future) or of a class named by a dotted path
``"package.module:ClassName"`` (patched when that module is imported, now or later):

- ``send`` (default ``send_to_thread``): routed through :meth:`emitguard.Guard.send`;
- ``associate`` (default ``update_connection_thread``): a truthy return marks the thread
  connected, which wakes waiting sends and flushes the outbox;
- ``disconnect`` (default none, e.g. ``"disconnect_user"``): its first argument is the owner
  whose threads lose their connection.

Originals may be sync or async; signatures are preserved; ``emitguard.unguard`` restores the
exact original attributes.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import wrapt

from emitguard import AdapterError, Guard, GuardOptions, hookimpl
from emitguard.api import check_same_options
from emitguard.calls import MISSING
from emitguard.engine import GUARD_ARGUMENTS
from emitguard_adapters._params import other, parameters, resolve

__all__ = ["ADAPTER_OPTIONS", "ManagerAdapter", "emitguard_adapt"]

log = logging.getLogger("emitguard.adapters.manager")
_numbers = itertools.count(1)


ADAPTER_OPTIONS: dict[str, Any] = {
    "send": "send_to_thread",
    "associate": "update_connection_thread",
    "disconnect": None,
    "thread_param": "thread_id",
    "message_param": None,
    "owner_param": None,
}
"""The manager adapter's own options and their defaults; every other option goes to Guard."""

_VALID_OPTIONS = {*ADAPTER_OPTIONS, *GuardOptions.__dataclass_fields__, *GUARD_ARGUMENTS}


if TYPE_CHECKING:
    _FunctionWrapper = wrapt.FunctionWrapper[..., Any]
else:  # wrapt's classes are not subscriptable at run time in every release
    _FunctionWrapper = wrapt.FunctionWrapper


class GuardedMethod(_FunctionWrapper):
    """The wrapt proxy emitguard puts in place of a manager method."""

    _self_adapter: Any


@hookimpl(trylast=True)
def emitguard_adapt(target: Any, options: dict[str, Any]) -> Any:
    """Adapt any object with the named methods, a class, or a ``"module:Class"`` path."""
    return ManagerAdapter.create(target, options)


class _Alias:
    """The target is already guarded through another route (its class, its dotted path)."""

    def __init__(self, adapter: ManagerAdapter) -> None:
        self.guard = adapter.guard

    def unguard(self) -> None:
        """Nothing to undo here: unguard the target that was guarded first."""


class _Patch:
    """One attribute replaced on a class or an instance, and how to put it back."""

    def __init__(self, holder: Any, name: str, original: Any, had_own: bool) -> None:
        self.holder = holder
        self.name = name
        self.original = original
        self.had_own = had_own

    def undo(self) -> None:
        current = _own_attrs(self.holder).get(self.name, MISSING)
        if not isinstance(current, GuardedMethod):
            log.warning(
                "%r.%s was replaced after emitguard wrapped it; left as it is",
                self.holder,
                self.name,
            )
            return
        if self.had_own:
            setattr(self.holder, self.name, self.original)
        else:
            delattr(self.holder, self.name)


class ManagerAdapter:
    """Wraps a manager's send, associate and disconnect methods around one guard."""

    def __init__(self, target: Any, options: dict[str, Any], guard: Guard) -> None:
        self.target = target
        self.options = dict(options)
        self.guard = guard
        self.roles = _roles(options)
        self.patches: list[_Patch] = []
        self.active = True

    @classmethod
    def create(cls, target: Any, options: dict[str, Any]) -> ManagerAdapter | _Alias:
        """Guard ``target`` or raise :class:`AdapterError` saying why it cannot be."""
        roles = _roles(options)
        for role in ("send", "associate", "disconnect"):
            value = roles[role]
            if value is not None and (not isinstance(value, str) or not value.isidentifier()):
                raise AdapterError(f"{role} must be a method name, got {value!r}")
        if roles["send"] is None:
            raise AdapterError("send must name the manager's send method, got None")
        unknown = sorted(set(options) - _VALID_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown guard option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(_VALID_OPTIONS))}"
            )
        guard_options = {k: v for k, v in options.items() if k not in ADAPTER_OPTIONS}
        existing = _existing(target, roles["send"])
        if existing is not None:
            check_same_options(target, existing.normalize(existing.options), cls.normalize(options))
            return _Alias(existing)
        if isinstance(target, str):
            return cls._for_path(target, options, guard_options)
        if "name" not in guard_options:  # unique: "ReferenceManager-3"
            kind = target if isinstance(target, type) else type(target)
            guard_options["name"] = f"{kind.__qualname__}-{next(_numbers)}"
        adapter = cls(target, options, Guard(**guard_options))
        adapter.patch(target)
        return adapter

    @staticmethod
    def normalize(options: dict[str, Any]) -> dict[str, Any]:
        """Options with every default filled in, to compare two calls of guard()."""
        roles = _roles(options)
        rest = {k: v for k, v in options.items() if k not in ADAPTER_OPTIONS}
        extra: dict[str, Any] = {k: rest.pop(k) for k in GUARD_ARGUMENTS if k in rest}
        return {**roles, **GuardOptions.from_kwargs(rest).as_dict(), **extra}

    @classmethod
    def _for_path(
        cls, path: str, options: dict[str, Any], guard_options: dict[str, Any]
    ) -> ManagerAdapter:
        module_name, _, qualname = path.partition(":")
        if (
            not module_name
            or not qualname
            or not all(
                part.isidentifier() for part in [*module_name.split("."), *qualname.split(".")]
            )
        ):
            raise AdapterError(
                f"a dotted-path target looks like 'package.module:ClassName', got {path!r}"
            )
        guard_options.setdefault("name", f"{qualname}-{next(_numbers)}")
        adapter = cls(path, options, Guard(**guard_options))
        if module_name in sys.modules:
            adapter.patch(_resolve(sys.modules[module_name], qualname, path))
            return adapter

        def on_import(module: Any) -> None:
            if not adapter.active:
                return
            try:
                adapter.patch(_resolve(module, qualname, path))
            except AdapterError:
                log.exception(
                    "emitguard could not guard %s when %s was imported", path, module_name
                )

        wrapt.register_post_import_hook(on_import, module_name)
        return adapter

    # ------------------------------------------------------------ patching

    def patch(self, holder: Any) -> None:
        """Wrap the methods on ``holder`` (a class or an instance); all or nothing."""
        is_class = isinstance(holder, type)
        plans: list[tuple[str, Any, Callable[..., Any]]] = []
        for role, make in (
            ("send", self._send_wrapper),
            ("associate", self._associate_wrapper),
            ("disconnect", self._disconnect_wrapper),
        ):
            name = self.roles[role]
            if name is None:
                continue
            raw = inspect.getattr_static(holder, name, MISSING)
            if raw is MISSING:
                raise AdapterError(
                    f"{_label(holder)} has no method {name!r}; pass {role}='<method name>' "
                    f"to emitguard.guard() to use another one"
                    + (" or associate=None to mark threads yourself" if role == "associate" else "")
                )
            func = (
                raw
                if isinstance(raw, (staticmethod, classmethod, property))
                else getattr(holder, name)
            )
            if not callable(func) or isinstance(raw, (staticmethod, classmethod, property)):
                raise AdapterError(
                    f"{_label(holder)}.{name} is not a plain method ({type(raw).__name__}); "
                    f"pass {role}= to name the method to guard"
                )
            plans.append(
                (name, raw, make(func, bound=not is_class, where=f"{_label(holder)}.{name}"))
            )
        own = _own_attrs(holder, writable=True)
        for name, raw, wrapper in plans:
            had_own = name in own
            original = own[name] if had_own else raw
            proxied = raw if is_class else getattr(holder, name)
            proxy = GuardedMethod(proxied, wrapper)
            proxy._self_adapter = self
            try:
                setattr(holder, name, proxy)
            except (AttributeError, TypeError) as exc:
                self.unpatch()
                raise AdapterError(f"cannot wrap {_label(holder)}.{name}: {exc}") from exc
            self.patches.append(_Patch(holder, name, original, had_own))

    def unguard(self) -> None:
        """Restore every wrapped attribute; a later import of a dotted path patches nothing."""
        self.active = False
        self.unpatch()

    def unpatch(self) -> None:
        while self.patches:
            self.patches.pop().undo()

    # ------------------------------------------------------------ wrappers

    def _send_wrapper(
        self, func: Callable[..., Any], *, bound: bool, where: str
    ) -> Callable[..., Any]:
        params = parameters(func, bound=bound)
        thread = resolve(params, self.roles["thread_param"], where=where, option="thread_param")
        wanted = self.roles["message_param"]
        message = (
            resolve(params, wanted, where=where, option="message_param")
            if wanted is not None
            else other(params, thread, after=True, where=where, option="message_param")
        )
        if inspect.iscoroutinefunction(func):
            return self.guard.sender(thread, message)
        return self.guard.sync_sender(thread, message)

    def _associate_wrapper(
        self, func: Callable[..., Any], *, bound: bool, where: str
    ) -> Callable[..., Any]:
        params = parameters(func, bound=bound)
        thread = resolve(params, self.roles["thread_param"], where=where, option="thread_param")
        wanted = self.roles["owner_param"]
        owner = (
            resolve(params, wanted, where=where, option="owner_param")
            if wanted is not None
            else other(params, thread, after=False, where=where, option="owner_param")
        )

        def settle(args: Any, kwargs: Any, result: Any, error: BaseException | None) -> None:
            thread_id = thread.pick(args, kwargs)
            if not isinstance(thread_id, str) or not thread_id:
                log.warning(
                    "%s called with thread %r: not a thread id, guard unchanged", where, thread_id
                )
                return
            try:
                if error is not None:
                    self.guard.mark_error(thread_id, error)
                elif result or result is None:  # None: an association that reports nothing
                    self.guard.mark_connected(thread_id, _value(owner.pick(args, kwargs)))
                else:  # not ready, but another owner may still carry the thread: no change
                    log.debug(
                        "%s returned %r: thread %s not marked ready", where, result, thread_id
                    )
            except Exception:
                log.exception("emitguard failed to record %s; the call itself succeeded", where)

        return _observer(func, settle)

    def _disconnect_wrapper(
        self, func: Callable[..., Any], *, bound: bool, where: str
    ) -> Callable[..., Any]:
        params = parameters(func, bound=bound)
        wanted = self.roles["owner_param"]
        owner = resolve(
            params, wanted if wanted is not None else 0, where=where, option="owner_param"
        )

        def settle(args: Any, kwargs: Any, result: Any, error: BaseException | None) -> None:
            try:
                self.guard.disconnect_owner(_value(owner.pick(args, kwargs)), f"{where} called")
            except Exception:
                log.exception("emitguard failed to record %s; the call itself succeeded", where)

        return _observer(func, settle)


def _observer(
    func: Callable[..., Any], settle: Callable[[Any, Any, Any, BaseException | None], None]
) -> Callable[..., Any]:
    """A wrapt wrapper that calls the original, then ``settle(args, kwargs, result, error)``;
    the original's result and exceptions pass through unchanged."""
    if inspect.iscoroutinefunction(func):

        def call_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            async def run() -> Any:
                try:
                    result = await wrapped(*args, **kwargs)
                except Exception as exc:
                    settle(args, kwargs, None, exc)
                    raise
                settle(args, kwargs, result, None)
                return result

            return run()

        return call_async

    def call(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        try:
            result = wrapped(*args, **kwargs)
        except Exception as exc:
            settle(args, kwargs, None, exc)
            raise
        settle(args, kwargs, result, None)
        return result

    return call


def _roles(options: dict[str, Any]) -> dict[str, Any]:
    """The adapter's own options, defaults filled in."""
    return {name: options.get(name, default) for name, default in ADAPTER_OPTIONS.items()}


def _value(value: Any) -> Any:
    return None if value is MISSING else value


def _existing(target: Any, send_name: str) -> ManagerAdapter | None:
    """The adapter already guarding ``target`` (or its class), if any."""
    if isinstance(target, str):
        module_name, _, qualname = target.partition(":")
        module = sys.modules.get(module_name)
        if module is None:
            return None
        try:
            target = _resolve(module, qualname, target)
        except AdapterError:
            return None
    raw = inspect.getattr_static(target, send_name, None)
    if isinstance(raw, GuardedMethod):
        adapter = raw._self_adapter
        return adapter if isinstance(adapter, ManagerAdapter) and adapter.active else None
    return None


def _resolve(module: Any, qualname: str, path: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, MISSING)
        if obj is MISSING:
            raise AdapterError(f"{path!r}: module {module.__name__!r} has no {qualname!r}")
    return obj


def _own_attrs(holder: Any, writable: bool = False) -> dict[str, Any]:
    if isinstance(holder, type):
        return dict(vars(holder))
    try:
        return vars(holder)  # type: ignore[no-any-return]
    except TypeError:
        if writable:
            raise AdapterError(
                f"{_label(holder)} has no __dict__ (uses __slots__?); guard its class instead"
            ) from None
        return {}


def _label(holder: Any) -> str:
    if isinstance(holder, type):
        return holder.__qualname__
    return f"{type(holder).__qualname__} instance"
