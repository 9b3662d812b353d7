"""What adapter authors need, and applications do not: one module for them.

An adapter turns a concrete stack's calls into engine calls (see ``docs/concepts.md``):

- :data:`GUARD_ARGUMENTS`, :func:`check_same_options`: to split and compare ``guard()`` options;
- :class:`Arg`, :data:`MISSING`, :class:`Call`, :data:`Rebind`, :data:`WraptWrapper`: where a
  send's thread and message sit in a call, and the wrapt calling convention
  (:meth:`emitguard.Guard.sender` returns such a wrapper);
- :class:`Verdict`, :func:`judge`: how a send's result is judged;
- :func:`thread_id_problem`: why a value is not a usable thread id (the one rule);
- :mod:`emitguard.transport`: delivery confirmation and the connection being served;
- the ``emitguard_adapt`` hook (:mod:`emitguard.hooks`) and the ``emitguard`` entry-point group.
"""

from __future__ import annotations

from emitguard import transport
from emitguard._ids import id_problem as thread_id_problem
from emitguard.api import check_same_options
from emitguard.calls import MISSING, AnyOf, Arg, Call, Rebind, Verdict, WraptWrapper, judge
from emitguard.engine import GUARD_ARGUMENTS
from emitguard.hooks import ENTRY_POINT_GROUP, hookspec

__all__ = [
    "ENTRY_POINT_GROUP",
    "GUARD_ARGUMENTS",
    "MISSING",
    "AnyOf",
    "Arg",
    "Call",
    "Rebind",
    "Verdict",
    "WraptWrapper",
    "check_same_options",
    "hookspec",
    "judge",
    "thread_id_problem",
    "transport",
]
