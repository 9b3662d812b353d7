"""The guards alive in this process (weakly held), so that hooks can tell them of changes."""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["add", "guards"]

_live: weakref.WeakSet[Any] = weakref.WeakSet()


def add(guard: Any) -> None:
    """Remember a guard for as long as something else keeps it alive."""
    _live.add(guard)


def discard(guard: Any) -> None:
    """Forget a guard (it was closed)."""
    _live.discard(guard)


def guards() -> list[Any]:
    """Every remembered guard."""
    return list(_live)
