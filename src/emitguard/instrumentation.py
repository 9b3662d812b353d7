"""``EmitguardInstrumentor``: emitguard's telemetry switched the OpenTelemetry way.

Guards trace through ``opentelemetry-api`` whether or not this module is used (see
``docs/tracing.md``). The instrumentor adds what OpenTelemetry users expect of a library:

- ``opentelemetry-instrument python app.py`` loads it (entry point group
  ``opentelemetry_instrumentor``, name ``emitguard``), so ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS``
  and the other settings of that command apply to it;
- ``EmitguardInstrumentor().instrument(tracer_provider=..., meter_provider=...)``: the
  providers stand in for the global ones in every guard not given its own, and a guard that
  has not found an SDK yet looks for one on each send, so an SDK configured later traces the
  very next send;
- ``uninstrument()``: no guard records spans or metrics until ``instrument()`` is called again.

It needs the ``otel-instrument`` extra (``opentelemetry-instrumentation``, which provides
``BaseInstrumentor``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,  # (the module is marked untyped as a whole)
)

from emitguard import _live
from emitguard._telemetry import INSTRUMENTATION

__all__ = ["EmitguardInstrumentor"]


class EmitguardInstrumentor(BaseInstrumentor):  # type: ignore[misc]  # (an untyped base)
    """Turns emitguard's spans and metrics on (``instrument``) and off (``uninstrument``) in
    every guard of the process, present and future. A singleton, like every
    ``BaseInstrumentor``."""

    def instrumentation_dependencies(self) -> Collection[str]:
        """Nothing to check: the instrumented library is emitguard itself."""
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        INSTRUMENTATION.set(True, kwargs.get("tracer_provider"), kwargs.get("meter_provider"))
        _refresh_guards()

    def _uninstrument(self, **kwargs: Any) -> None:
        INSTRUMENTATION.set(False)
        _refresh_guards()


def _refresh_guards() -> None:
    for guard in _live.guards():
        guard.refresh()
