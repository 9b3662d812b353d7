"""Find a method's thread, message and owner arguments by name, position or aliases, per
role."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from emitguard import AdapterError
from emitguard.calls import AnyOf, Arg

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def parameters(func: Callable[..., Any], *, bound: bool) -> list[inspect.Parameter]:
    """The parameters a caller passes (without ``self`` for an unbound method)."""
    params = list(inspect.signature(func).parameters.values())
    if not bound and params and params[0].kind in _POSITIONAL:
        params = params[1:]
    return params


def resolve(params: list[inspect.Parameter], wanted: str | int, *, where: str, option: str) -> Arg:
    """Locate parameter ``wanted`` (a name or a position) or raise :class:`AdapterError`."""
    names = ", ".join(p.name for p in params) or "no parameters"
    if isinstance(wanted, bool) or not isinstance(wanted, (str, int)):
        raise AdapterError(f"{option} must be a parameter name or a position, got {wanted!r}")
    if isinstance(wanted, int):
        positional = [p for p in params if p.kind in _POSITIONAL]
        if not 0 <= wanted < len(positional):
            raise AdapterError(
                f"{where}({names}) has no positional parameter {wanted}; "
                f"pass {option}= with a name or a position from 0 to {len(positional) - 1}"
            )
        param = positional[wanted]
        return Arg(
            wanted, param.name if param.kind is not inspect.Parameter.POSITIONAL_ONLY else None
        )
    for position, param in enumerate(params):
        if param.name == wanted:
            index = position if param.kind in _POSITIONAL else None
            return Arg(index, None if param.kind is inspect.Parameter.POSITIONAL_ONLY else wanted)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return Arg(None, wanted)
    raise AdapterError(f"{where}({names}) has no parameter {wanted!r}; pass {option}= to name it")


def resolve_any(
    params: list[inspect.Parameter], wanted: object, *, where: str, option: str
) -> Arg | AnyOf:
    """:func:`resolve`, or for a tuple or list of names (aliases: the call may pass any of
    them) an :class:`AnyOf` of them all, each of which must exist."""
    if isinstance(wanted, (tuple, list)):
        if not wanted:
            raise AdapterError(
                f"{option} must be a parameter name, a position or aliases (a tuple of "
                f"names), got {wanted!r}"
            )
        found = tuple(resolve(params, alias, where=where, option=option) for alias in wanted)
        return found[0] if len(found) == 1 else AnyOf(found)
    return resolve(params, wanted, where=where, option=option)  # type: ignore[arg-type]


def taken_args(spec: Arg | AnyOf | None) -> list[Arg]:
    """The plain arguments a resolved spec stands for."""
    if spec is None:
        return []
    return list(spec.args) if isinstance(spec, AnyOf) else [spec]


def other(
    params: list[inspect.Parameter],
    taken: Arg | AnyOf | list[Arg],
    *,
    after: bool,
    where: str,
    option: str,
) -> Arg:
    """The first positional parameter that is none of ``taken`` (after the first of them,
    when ``after`` and such a parameter exists)."""
    used = taken if isinstance(taken, list) else taken_args(taken)
    positional = [p for p in params if p.kind in _POSITIONAL]
    free = [
        position
        for position, param in enumerate(positional)
        if not any(position == arg.index or param.name == arg.name for arg in used)
    ]
    first = used[0].index if used and used[0].index is not None else None
    if after and first is not None:
        free = [position for position in free if position > first]
    if free:
        return resolve(params, free[0], where=where, option=option)
    names = ", ".join(p.name for p in params) or "no parameters"
    raise AdapterError(f"{where}({names}) has no parameter to use; pass {option}= to name it")


def signature_text(params: list[inspect.Parameter]) -> str:
    """``a, b, c``: the parameter names, for error messages."""
    return ", ".join(p.name for p in params) or "no parameters"
