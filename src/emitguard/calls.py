"""Call plumbing shared by the engine and adapters: where a send's thread and message sit in a
call, deferred calls of the original send, and how a send's result is judged."""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MISSING",
    "Accept",
    "AnyOf",
    "Arg",
    "Call",
    "Rebind",
    "Verdict",
    "WraptWrapper",
    "judge",
    "rebind_only",
]

MISSING: Any = object()
"""What :meth:`Arg.pick` returns for an argument the call did not pass."""

Rebind = Callable[[tuple[Any, ...], dict[str, Any], Any], tuple[tuple[Any, ...], dict[str, Any]]]
"""``rebind(args, kwargs, message)``: the call's arguments with ``message`` put in."""

WraptWrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]
"""The calling convention of a wrapt wrapper: ``(wrapped, instance, args, kwargs)``."""

Accept = Callable[[Any], bool]
"""``accept(result)``: whether a send that returned ``result`` (and did not raise) delivered."""


@dataclass(frozen=True)
class Arg:
    """One argument of a call: its position (``None`` when keyword-only) and its keyword
    (``None`` when positional-only)."""

    index: int | None
    name: str | None

    @property
    def reach(self) -> int:
        """The position, or ``sys.maxsize`` when the argument can only come by keyword."""
        return sys.maxsize if self.index is None else self.index

    def pick(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The argument's value in a call, or :data:`MISSING`."""
        if self.index is not None and self.index < len(args):
            return args[self.index]
        if self.name is not None:
            return kwargs.get(self.name, MISSING)
        return MISSING

    def replace(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with this one set to ``value``."""
        if self.index is not None and self.index < len(args):
            return (*args[: self.index], value, *args[self.index + 1 :]), kwargs
        return args, {**kwargs, str(self.name): value}


@dataclass(frozen=True)
class AnyOf:
    """One argument that a call may pass under any of several parameters (aliases, e.g.
    python-socketio's ``emit(..., to=None, room=None)``): the first one passed and not
    ``None`` counts."""

    args: tuple[Arg, ...]

    @property
    def reach(self) -> int:
        """Always ``sys.maxsize``: every call is looked at through :meth:`pick`."""
        return sys.maxsize

    def pick(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The first alias's value that is neither missing nor ``None``; ``None`` when one
        was passed as ``None``, else :data:`MISSING`."""
        found: Any = MISSING
        for arg in self.args:
            value = arg.pick(args, kwargs)
            if value is MISSING:
                continue
            if value is not None:
                return value
            found = None
        return found

    def replace(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with the first alias passed set to ``value``."""
        for arg in self.args:
            if arg.pick(args, kwargs) not in (MISSING, None):
                return arg.replace(args, kwargs, value)
        return self.args[0].replace(args, kwargs, value)


class Call:
    """A deferred call of the original send with a given message: ``call(message)``.

    ``kind``: the event type when the call names it in an argument of its own (``emit(event,
    data, room)``); ``None`` to read it from the message.
    """

    __slots__ = ("args", "fn", "kind", "kwargs", "rebind")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
        kind: str | None = None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.rebind = rebind
        self.kind = kind

    def __call__(self, message: Any) -> Any:
        args, kwargs = self.rebind(self.args, self.kwargs, message)
        return self.fn(*args, **kwargs)


def rebind_only(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The rebind of a call whose only argument is the message."""
    return (message,), kwargs


class Verdict(enum.Enum):
    """How one call of the original send went."""

    OK = "ok"
    """Delivered: it returned a truthy value or ``None`` (a send that reports nothing)."""
    RETRY = "retry"
    """Not delivered and worth another try: it returned a falsy value or raised (a transport
    error); the thread is taken as disconnected."""
    POISON = "poison"
    """The send can never take this message (it raised one of the ``poison`` types, e.g.
    ``TypeError``): not retried, the thread keeps its state."""


def judge(result: Any, accept: Accept | None = None) -> tuple[Verdict, str | None]:
    """The verdict on a send that returned ``result``: by default a truthy value or ``None``
    delivered; with ``accept`` (the guard's ``verdict`` option), what it says."""
    if accept is None:
        if result or result is None:
            return Verdict.OK, None
        return Verdict.RETRY, f"send returned {result!r}"
    if accept(result):
        return Verdict.OK, None
    return Verdict.RETRY, f"send returned {result!r} (not delivered, says the verdict option)"


def judge_error(exc: BaseException, poison: tuple[type[BaseException], ...]) -> tuple[Verdict, str]:
    """The verdict on a send that raised ``exc``."""
    text = f"send raised {type(exc).__name__}: {exc}"
    if isinstance(exc, poison):
        return Verdict.POISON, f"{text} (the send cannot take this message; not retried)"
    return Verdict.RETRY, text
