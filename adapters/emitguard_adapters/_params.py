"""Find a method's thread, message and owner arguments by name or position."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from emitguard import AdapterError
from emitguard.calls import Arg

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


def other(
    params: list[inspect.Parameter], taken: Arg, *, after: bool, where: str, option: str
) -> Arg:
    """The first positional parameter other than ``taken`` (after it, when ``after``)."""
    positional = [p for p in params if p.kind in _POSITIONAL]
    for position, param in enumerate(positional):
        if position == taken.index or param.name == taken.name:
            continue
        if after and taken.index is not None and position < taken.index:
            continue
        return resolve(params, position, where=where, option=option)
    names = ", ".join(p.name for p in params) or "no parameters"
    raise AdapterError(f"{where}({names}) has no parameter to use; pass {option}= to name it")
