"""Where a send's thread and message sit in a call, for adapters that wrap a method."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["MISSING", "Arg"]

MISSING: Any = object()
"""What :meth:`Arg.pick` returns for an argument the call did not pass."""


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

    def shifted(self, by: int) -> Arg:
        """The same argument when ``by`` arguments are put in front of the call."""
        return Arg(None if self.index is None else self.index + by, self.name)
