"""Guard a legacy connection manager in place, with wrapt.

``emitguard.guard(manager)`` wraps up to four methods of a manager instance, of a manager
class (every instance, present and future) or of a class named by a dotted path
``"package.module:ClassName"`` (patched when that module is imported, now or later):

- ``send`` (default ``send_to_thread``): routed through the guard's send pipeline; a call
  that names no thread (a broadcast) passes through unchanged;
- ``associate`` (default ``update_connection_thread``): a truthy (or ``None``) return marks
  the thread connected, which wakes waiting sends and flushes the outbox; sends made inside
  the call to the thread it associates are delivered at once (a greeting);
- ``disconnect`` (default none, e.g. ``"disconnect_user"``): the owner whose threads lose
  their connection;
- ``leave`` (default none, e.g. ``"leave_room"``): the owner leaves one thread.

The thread argument is named per role (``thread_param``, with aliases); the owner argument
of associate, disconnect and leave follows one rule (``owner_param``, else the first
positional parameter that is not the role's thread). Originals may be sync or async;
signatures are preserved; ``emitguard.unguard`` restores the exact original attributes.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import wrapt

from emitguard import AdapterError, Guard, GuardOptions, hookimpl, transport
from emitguard.api import check_same_options
from emitguard.calls import MISSING, AnyOf, Arg
from emitguard.engine import GUARD_ARGUMENTS
from emitguard.extending import thread_id_problem
from emitguard_adapters._params import (
    other,
    parameters,
    resolve,
    resolve_any,
    signature_text,
    taken_args,
)

__all__ = ["ADAPTER_OPTIONS", "ManagerAdapter", "emitguard_adapt"]

log = logging.getLogger("emitguard.adapters.manager")
_numbers = itertools.count(1)


ADAPTER_OPTIONS: dict[str, Any] = {
    "send": "send_to_thread",
    "associate": "update_connection_thread",
    "disconnect": None,
    "leave": None,
    "thread_param": "thread_id",
    "message_param": None,
    "owner_param": None,
    "event_type": None,
}
"""The manager adapter's own options and their defaults; every other option goes to Guard
(a callable ``event_type`` too: it reads the type from the message)."""

METHOD_ROLES = ("send", "associate", "disconnect", "leave")
THREAD_ROLES = ("send", "associate", "leave")
"""The roles whose method names a thread (``thread_param`` may be given per role)."""
OWNER_ROLES = ("associate", "disconnect", "leave")
"""The roles whose method names an owner (``owner_param`` may be given per role)."""

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
        self._owners: dict[str, tuple[Arg, bool, str, str]] = {}
        """Per role: its owner argument, whether owner_param named it, and for messages the
        method and its parameters."""
        self.active = True

    @classmethod
    def create(cls, target: Any, options: dict[str, Any]) -> ManagerAdapter | _Alias:
        """Guard ``target`` or raise :class:`AdapterError` saying why it cannot be."""
        roles = _roles(options)
        for role in METHOD_ROLES:
            value = roles[role]
            if value is not None and (not isinstance(value, str) or not value.isidentifier()):
                raise AdapterError(f"{role} must be a method name, got {value!r}")
        if roles["send"] is None:
            raise AdapterError("send must name the manager's send method, got None")
        _check_per_role("thread_param", roles["thread_param"], THREAD_ROLES)
        _check_per_role("owner_param", roles["owner_param"], OWNER_ROLES)
        unknown = sorted(set(options) - _VALID_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown guard option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(_VALID_OPTIONS))}"
            )
        guard_options = _guard_options(options)
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
        rest = _guard_options(options)
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
        self._owners = {}
        for role, make in (
            ("send", self._send_wrapper),
            ("associate", self._associate_wrapper),
            ("disconnect", self._disconnect_wrapper),
            ("leave", self._leave_wrapper),
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
        self._check_owners()
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

    def _thread(self, role: str, params: list[inspect.Parameter], where: str) -> Arg | AnyOf:
        """The thread argument of the role's method (``thread_param``, per role or for all)."""
        spec = self.roles["thread_param"]
        if isinstance(spec, dict):
            fallback = spec.get("associate", "thread_id") if role == "leave" else "thread_id"
            spec = spec.get(role, fallback)
        return resolve_any(params, spec, where=where, option="thread_param")

    def _owner(
        self, role: str, params: list[inspect.Parameter], thread: Arg | AnyOf | None, where: str
    ) -> Arg:
        """The owner argument of the role's method, by one rule: ``owner_param`` (per role
        or for all) when given, else the first positional parameter that is not the role's
        thread."""
        spec = self.roles["owner_param"]
        explicit = spec.get(role) if isinstance(spec, dict) else spec
        option = "owner_param"
        if explicit is not None:
            owner = resolve(params, explicit, where=where, option=option)
        elif thread is None:  # no thread to skip: the first positional parameter
            owner = resolve(params, 0, where=where, option=option)
        else:
            owner = other(params, taken_args(thread), after=False, where=where, option=option)
        self._owners[role] = (owner, explicit is not None, where, signature_text(params))
        return owner

    def _check_owners(self) -> None:
        """Refuse, at guard time, an owner argument of disconnect or leave that cannot hold
        what associate recorded (they name different parameters): the call would find no
        thread, and disconnects would be silent no-ops."""
        if "associate" not in self._owners:
            return
        owner, explicit, where, names = self._owners["associate"]
        for role in ("disconnect", "leave"):
            if role not in self._owners:
                continue
            other_owner, other_explicit, other_where, other_names = self._owners[role]
            if explicit or other_explicit or None in (owner.name, other_owner.name):
                continue  # the user said which parameter holds the owner
            if _stem(owner.name) == _stem(other_owner.name):
                continue
            raise AdapterError(
                f"{other_where}({other_names}) takes its owner from {other_owner.name!r}, "
                f"but {where}({names}) records owners from {owner.name!r}: the {role} "
                f"would find no thread (a silent no-op). Pass owner_param={{'associate': "
                f"'<parameter>', '{role}': '<parameter>'}} naming parameters that hold the "
                f"same value (the same user or connection id), or {role}=None and call "
                f"guard.{'disconnect_owner' if role == 'disconnect' else 'leave'}() yourself"
            )

    def _send_wrapper(
        self, func: Callable[..., Any], *, bound: bool, where: str
    ) -> Callable[..., Any]:
        params = parameters(func, bound=bound)
        thread = self._thread("send", params, where)
        wanted_kind = self.roles["event_type"]
        kind = (
            resolve(params, wanted_kind, where=where, option="event_type")
            if wanted_kind is not None and not callable(wanted_kind)
            else None
        )
        wanted = self.roles["message_param"]
        message = (
            resolve(params, wanted, where=where, option="message_param")
            if wanted is not None
            else other(  # after the thread; anywhere when the event type has its own argument
                params,
                [*taken_args(thread), *taken_args(kind)],
                after=kind is None,
                where=where,
                option="message_param",
            )
        )
        if inspect.iscoroutinefunction(func):
            return self.guard.sender(thread, message, kind)
        return self.guard.sync_sender(thread, message, kind)

    def _associate_wrapper(
        self, func: Callable[..., Any], *, bound: bool, where: str
    ) -> Callable[..., Any]:
        params = parameters(func, bound=bound)
        thread = self._thread("associate", params, where)
        owner = self._owner("associate", params, thread, where)

        def around(args: Any, kwargs: Any) -> Any:
            thread_id = thread.pick(args, kwargs)
            if thread_id_problem(thread_id) is not None:
                return contextlib.nullcontext()
            return transport.association(thread_id)

        def settle(args: Any, kwargs: Any, result: Any, error: BaseException | None) -> None:
            thread_id = thread.pick(args, kwargs)
            if thread_id_problem(thread_id) is not None:
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

        return _observer(func, settle, around)

    def _disconnect_wrapper(
        self, func: Callable[..., Any], *, bound: bool, where: str
    ) -> Callable[..., Any]:
        params = parameters(func, bound=bound)
        owner = self._owner("disconnect", params, None, where)

        def settle(args: Any, kwargs: Any, result: Any, error: BaseException | None) -> None:
            try:
                self.guard.disconnect_owner(_value(owner.pick(args, kwargs)), f"{where} called")
            except Exception:
                log.exception("emitguard failed to record %s; the call itself succeeded", where)

        return _observer(func, settle)

    def _leave_wrapper(
        self, func: Callable[..., Any], *, bound: bool, where: str
    ) -> Callable[..., Any]:
        params = parameters(func, bound=bound)
        thread = self._thread("leave", params, where)
        owner = self._owner("leave", params, thread, where)

        def settle(args: Any, kwargs: Any, result: Any, error: BaseException | None) -> None:
            thread_id = thread.pick(args, kwargs)
            if error is not None or thread_id_problem(thread_id) is not None:
                return
            try:
                self.guard.leave(thread_id, _value(owner.pick(args, kwargs)), f"{where} called")
            except Exception:
                log.exception("emitguard failed to record %s; the call itself succeeded", where)

        return _observer(func, settle)


def _observer(
    func: Callable[..., Any],
    settle: Callable[[Any, Any, Any, BaseException | None], None],
    around: Callable[[Any, Any], contextlib.AbstractContextManager[Any]] | None = None,
) -> Callable[..., Any]:
    """A wrapt wrapper that calls the original (inside ``around(args, kwargs)``, when given),
    then ``settle(args, kwargs, result, error)``; the original's result and exceptions pass
    through unchanged."""

    def inside(args: Any, kwargs: Any) -> contextlib.AbstractContextManager[Any]:
        return around(args, kwargs) if around is not None else contextlib.nullcontext()

    if inspect.iscoroutinefunction(func):

        def call_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            async def run() -> Any:
                try:
                    with inside(args, kwargs):
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
            with inside(args, kwargs):
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


def _guard_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that go to the Guard (a callable ``event_type`` included)."""
    rest = {k: v for k, v in options.items() if k not in ADAPTER_OPTIONS}
    if callable(options.get("event_type")):
        rest["event_type"] = options["event_type"]
    return rest


def _check_per_role(option: str, value: Any, roles: tuple[str, ...]) -> None:
    """A per-role option (a dict) names known roles only."""
    if not isinstance(value, dict):
        return
    unknown = sorted(set(value) - set(roles), key=str)
    if unknown:
        raise AdapterError(
            f"{option} names unknown role(s) {', '.join(map(repr, unknown))}; "
            f"its roles are {', '.join(roles)}"
        )


def _stem(name: str | None) -> str:
    """A parameter name without an ``_id``-like suffix: ``user_id`` and ``user`` hold the
    same owner; ``connection_id`` and ``user_id`` do not."""
    text = (name or "").lower()
    for suffix in ("_id", "id", "_key", "_name"):
        if text.endswith(suffix) and len(text) > len(suffix):
            return text[: -len(suffix)]
    return text


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
