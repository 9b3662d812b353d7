"""What a thread id may be: one rule, shared by the pipeline and the guard's own methods.

A thread is identified by whatever hashable id the stack uses (``str``, ``int``, ``UUID``, a
tuple such as ``(namespace, room)``). Not ``None`` (a send naming no thread passes through),
not a ``bool`` (``True == 1`` would alias thread 1), not an empty ``str``, nothing unhashable.
"""

from __future__ import annotations

import reprlib
from typing import Any

from emitguard.calls import MISSING

__all__ = ["id_problem", "names_no_thread", "shown"]

_WANTED = "thread_id must be a hashable id (str, int, UUID, tuple, ...)"


def names_no_thread(thread_id: object) -> bool:
    """The send names no thread (its thread argument is missing or ``None``): a broadcast,
    which the guard passes through."""
    return thread_id is None or thread_id is MISSING


def id_problem(thread_id: object) -> str | None:
    """Why ``thread_id`` is not a usable thread id, or ``None`` when it is."""
    if thread_id is MISSING:
        return f"{_WANTED}, got nothing (the call passed no thread)"
    if thread_id is None or isinstance(thread_id, bool):
        return f"{_WANTED}, not {thread_id!r}"
    if isinstance(thread_id, str) and not thread_id:
        return f"{_WANTED}, got an empty str"
    try:
        hash(thread_id)
    except TypeError:
        kind = type(thread_id).__name__
        return f"{_WANTED}, got unhashable {kind} {reprlib.repr(thread_id)}"
    return None


def shown(thread_id: object) -> Any:
    """A thread id for a record: the id itself when it is a usable one (records show it as it
    was given), else a readable stand-in."""
    if thread_id is MISSING:
        return "<missing>"
    if thread_id is None:
        return None
    return repr(thread_id) if id_problem(thread_id) is not None else thread_id
