"""Exceptions raised by emitguard."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emitguard.records import Emission

__all__ = ["AdapterError", "EmissionError"]


class AdapterError(Exception):
    """A target cannot be guarded (or unguarded) as asked.

    Raised at guard time, never during a send: a missing or non-callable method, a target no
    adapter recognises, or guarding the same target twice with different options.
    """


class EmissionError(Exception):
    """An emission ended badly and the guard runs in strict mode.

    ``emission`` is the record with the outcome and its reason.
    """

    def __init__(self, emission: Emission) -> None:
        super().__init__(str(emission))
        self.emission = emission
