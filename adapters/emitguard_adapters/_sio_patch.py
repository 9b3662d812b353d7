"""The wrapt proxy the python-socketio adapter puts in place of a method, and its undoing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import wrapt

if TYPE_CHECKING:
    _FunctionWrapper = wrapt.FunctionWrapper[..., Any]
else:  # wrapt's classes are not subscriptable at run time in every release
    _FunctionWrapper = wrapt.FunctionWrapper


class Guarded(_FunctionWrapper):
    """The wrapt proxy put in place of a python-socketio method."""


def original(method: Any) -> Any:
    """The method under a :class:`Guarded` proxy (the method itself when not guarded)."""
    return method.__wrapped__ if isinstance(method, Guarded) else method
