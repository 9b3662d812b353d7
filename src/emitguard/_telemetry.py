"""OpenTelemetry for one guard: a span per emission and per flush, outcome metrics.

Everything goes through ``opentelemetry-api``. When no SDK stands behind the providers (or
``tracing=False`` and ``metrics=False``) the guard is not *active* and its sends take the same
path as without this module. Spans follow the messaging semantic conventions; see
``docs/tracing.md`` for every name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import (
    Link,
    NoOpTracer,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)

from emitguard._metrics import EVENT_TYPE, GUARD, OUTCOME, Instruments, meter_of
from emitguard._version import __version__
from emitguard.options import GuardOptions
from emitguard.records import Emission, event_reader
from emitguard.states import Outcome

__all__ = ["FLUSH", "INSTRUMENTATION", "SEND", "Instrumentation", "Scope", "Telemetry"]

log = logging.getLogger("emitguard")

SEND, FLUSH = "send", "flush"
EXPIRE, DROP, FAIL = "expire", "drop", "fail"
_SETTLE = {Outcome.EXPIRED: EXPIRE, Outcome.DROPPED: DROP, Outcome.FAILED: FAIL}

SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
TEMPLATE = "messaging.destination.template"
MESSAGE_ID = "messaging.message.id"
ERROR_TYPE = "error.type"
BARRIER_WAIT = "emitguard.barrier.wait"
BUFFER_DURATION = "emitguard.buffer.duration"
REASON = "emitguard.reason"

_BAD = frozenset({Outcome.DROPPED, Outcome.EXPIRED, Outcome.FAILED, Outcome.REJECTED})

SpanHook = Callable[[Span, str, Any], None]
"""``span_hook(span, thread_id, message)``: add attributes to an emission's span."""


class Scope:
    """The span an engine step runs under, and what the step learnt for it.

    Opened around a send (and around each delivery attempt of a flush), it makes the span the
    current one, so the original send's own spans nest under it.
    """

    __slots__ = ("_context", "_token", "error", "record", "span")

    def __init__(self, span: Span | None) -> None:
        self.span = span
        self.record: Emission | None = None
        """The first record the step concluded with (the caller's own outcome)."""
        self.error: Exception | None = None
        """The last exception the original send raised."""
        self._token: Token[Scope | None] | None = None
        self._context: object = None

    def failed(self, exc: Exception) -> None:
        """The original send raised ``exc``: keep it, and record it on a recording span."""
        self.error = exc
        span = self.span
        if span is not None and span.is_recording():
            span.record_exception(exc)

    def __enter__(self) -> Scope:
        self._token = _scope.set(self)
        if self.span is not None:
            self._context = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._context is not None:
            otel_context.detach(self._context)  # type: ignore[arg-type]
            self._context = None
        if self._token is not None:
            with contextlib.suppress(ValueError):  # closed from another context (teardown)
                _scope.reset(self._token)
            self._token = None


_scope: ContextVar[Scope | None] = ContextVar("emitguard_scope", default=None)


class Instrumentation:
    """What ``EmitguardInstrumentor.instrument()`` / ``uninstrument()`` said, process-wide.

    ``state`` is ``None`` until either is called (guards trace whenever an SDK stands behind
    their providers), ``True`` once instrumented (the instrumentor's providers stand in for
    the global ones, and a guard that has not found an SDK yet looks again on each send) and
    ``False`` once uninstrumented (no spans, no metrics, from any guard). It starts ``False``
    when ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` names ``emitguard`` (or ``*``), as
    ``opentelemetry-instrument`` reads it.
    """

    __slots__ = ("meter_provider", "state", "tracer_provider")

    def __init__(self) -> None:
        disabled = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
        names = {name.strip() for name in disabled.split(",")}
        self.state: bool | None = False if names & {"emitguard", "*"} else None
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None

    def set(
        self,
        state: bool | None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.state = state
        self.tracer_provider, self.meter_provider = tracer_provider, meter_provider


INSTRUMENTATION = Instrumentation()


class Telemetry:
    """A guard's tracer and instruments, resolved from the providers it was given."""

    __slots__ = (
        "__weakref__",
        "_hook_failed",
        "_lock",
        "_meter_provider",
        "_metrics",
        "_names",
        "_outbox_size",
        "_seen",
        "_traced_by",
        "_tracer_provider",
        "_tracing",
        "active",
        "counts",
        "guard_name",
        "instruments",
        "span_hook",
        "template",
        "tracer",
        "type_of",
    )

    def __init__(
        self,
        options: GuardOptions,
        name: str,
        outbox_size: Callable[[], int],
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self._outbox_size = outbox_size
        self._lock = threading.Lock()
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.guard_name = name
        self.template = options.destination_template
        self._names = {op: f"{op} {self.template}" for op in (SEND, FLUSH, EXPIRE, DROP, FAIL)}
        self.span_hook: SpanHook | None = options.span_hook
        self.type_of = event_reader(options.event_type)
        self._hook_failed = False
        self._tracing, self._metrics = options.tracing, options.metrics
        self._traced_by: TracerProvider | None = None
        self._seen: tuple[object, object] | None = None
        self.tracer: Tracer | None = None
        self.instruments: Instruments | None = None
        self.active = False
        """Whether spans or metrics are recorded at all; when not, sends skip this module.
        Set by :meth:`refresh`, which the guard calls once it is built."""
        self.counts: dict[tuple[Outcome, str | None], int] = {}
        """Records by (outcome, event type), read by the ``emitguard.emissions`` counter."""

    # ------------------------------------------------------------- providers

    def refresh(self) -> bool:
        """Look for an SDK behind the providers again; True when anything changed."""
        on = INSTRUMENTATION.state is not False
        tracer = self._find_tracer() if self._tracing and on else None
        meter_provider = self._meter_provider
        if meter_provider is None:
            meter_provider = INSTRUMENTATION.meter_provider
        meter = meter_of(meter_provider, __version__) if self._metrics and on else None
        instruments = Instruments.of(meter) if meter is not None else None
        changed = tracer is not self.tracer or instruments is not self.instruments
        if self.instruments is not None and instruments is not self.instruments:
            self.instruments.members.discard(self)
        if instruments is not None:
            instruments.members.add(self)
        self.tracer, self.instruments = tracer, instruments
        self.active = tracer is not None or instruments is not None
        return changed

    @property
    def complete(self) -> bool:
        """Whether everything the options ask for was found (nothing left to look for)."""
        if INSTRUMENTATION.state is False:
            return True
        return (self.tracer is not None or not self._tracing) and (
            self.instruments is not None or not self._metrics
        )

    @property
    def probing(self) -> bool:
        """Instrumented and still missing a tracer or a meter: each send looks again
        (:meth:`stale`), so an SDK configured later traces the very next send."""
        return INSTRUMENTATION.state is True and not self.complete

    def stale(self) -> bool:
        """Whether the global providers changed since the last call (cheap: two look-ups)."""
        seen = (trace.get_tracer_provider(), metrics.get_meter_provider())
        if self._seen is not None and seen[0] is self._seen[0] and seen[1] is self._seen[1]:
            return False
        self._seen = seen
        return True

    def _find_tracer(self) -> Tracer | None:
        provider = self._tracer_provider
        if provider is None or isinstance(provider, ProxyTracerProvider):
            provider = INSTRUMENTATION.tracer_provider
        if provider is None or isinstance(provider, ProxyTracerProvider):
            provider = trace.get_tracer_provider()
        if isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
            return None
        if provider is self._traced_by and self.tracer is not None:
            return self.tracer
        tracer = provider.get_tracer("emitguard", __version__)
        if isinstance(tracer, NoOpTracer):
            return None
        self._traced_by = provider
        return tracer

    def isolate(self) -> None:
        """Run the current task under an empty OpenTelemetry context: a background task
        (the TTL sweep) must not inherit the span, or the suppression, of the send that
        happened to start it."""
        otel_context.attach(otel_context.Context())

    def outbox_size(self) -> int:
        return self._outbox_size()

    # ------------------------------------------------------------------ spans

    def start(
        self,
        operation: str,
        thread_id: Any,
        seq: int = 0,
        event_type: str | None = None,
        link: SpanContext | None = None,
        *,
        start_time: int | None = None,
        delivered: bool = False,
    ) -> Span | None:
        """Start a span for one step of an emission, or ``None`` when none is wanted.

        ``delivered``: the step is over and went well; the span gets its outcome at once.
        """
        tracer = self.tracer
        if tracer is None or otel_context.get_value(_SUPPRESS_INSTRUMENTATION_KEY):
            return None
        settle = operation in (EXPIRE, DROP, FAIL)
        attributes: dict[str, str] = {
            SYSTEM: "emitguard",
            OPERATION_TYPE: "settle" if settle else "send",
            OPERATION_NAME: operation,
            DESTINATION: str(thread_id),
            TEMPLATE: self.template,
        }
        if seq:
            attributes[MESSAGE_ID] = str(seq)
        if event_type is not None:
            attributes[EVENT_TYPE] = event_type
        if delivered:
            attributes[OUTCOME] = Outcome.DELIVERED.value
        links = [Link(link)] if link is not None and link.is_valid else None
        try:
            return tracer.start_span(
                self._names[operation],
                kind=SpanKind.INTERNAL if settle else SpanKind.PRODUCER,
                attributes=attributes,
                links=links,
                start_time=start_time,
            )
        except Exception:  # a broken tracer must not break the emission
            log.exception("emitguard could not start a span for thread %r", thread_id)
            return None

    def hook(self, span: Span | None, thread_id: Any, message: Any) -> None:
        """Run the user's ``span_hook``; its failure is logged, never raised."""
        hook = self.span_hook
        if hook is None or span is None or not span.is_recording():
            return
        try:
            hook(span, thread_id, message)
        except Exception:
            level = logging.DEBUG if self._hook_failed else logging.WARNING
            self._hook_failed = True
            log.log(level, "emitguard span_hook %r raised; the send goes on", hook, exc_info=True)

    @contextlib.contextmanager
    def sending(
        self,
        thread_id: Any,
        message: Any,
        seq: int = 0,
        start_time: int | None = None,
        error: Exception | None = None,
        kind: str | None = None,
    ) -> Iterator[Scope]:
        """Run a send under its span (current meanwhile), ended with the outcome the send
        concluded with. ``error``: the original already raised it (a failed fast delivery);
        ``kind``: the event type when the call names it apart from the message."""
        event_type = kind if kind is not None else self.type_of(message)
        scope = Scope(self.start(SEND, thread_id, seq, event_type, start_time=start_time))
        self.hook(scope.span, thread_id, message)
        if error is not None:
            scope.failed(error)
        try:
            with scope:
                yield scope
        finally:
            self.finish_send(scope)

    def finish_send(self, scope: Scope) -> None:
        """:meth:`finish` a send's scope and record the time it waited on the barrier."""
        record = scope.record
        if record is not None and record.waited and self.instruments is not None:
            self.instruments.barrier_wait.record(
                record.waited, {GUARD: self.guard_name, OUTCOME: record.outcome.value}
            )
        if scope.span is not None:
            self.end(scope.span, scope.record, scope.error, send=True)

    def finish(self, scope: Scope) -> None:
        """End the scope's span with the outcome the step concluded with."""
        if scope.span is not None:
            self.end(scope.span, scope.record, scope.error)

    def end(
        self,
        span: Span,
        record: Emission | None,
        error: BaseException | None,
        *,
        send: bool = False,
    ) -> None:
        """Set the outcome attributes (when recording) and end the span. ``send``: the
        emission's own span, which carries its barrier wait."""
        try:
            if record is not None and span.is_recording():
                _describe(span, record, error, send)
        except Exception:
            log.exception("emitguard could not describe the span of %s", record)
        finally:
            span.end()

    def settle(self, record: Emission, link: SpanContext | None) -> None:
        """A short span for an emission that left the outbox without a delivery attempt
        (expired, evicted, undeliverable), linked to the span that buffered it."""
        operation = _SETTLE.get(record.outcome)
        if operation is None or self.tracer is None:
            return
        span = self.start(operation, record.thread_id, record.seq, record.event_type, link)
        if span is not None:
            self.end(span, record, None)

    def failed_attempt(self, exc: Exception) -> None:
        """The original send raised: remember it for the scope and record it on its span."""
        scope = _scope.get()
        if scope is not None:
            scope.failed(exc)

    @staticmethod
    def concluded(record: Emission) -> None:
        """The current step's own record (the first one wins)."""
        scope = _scope.get()
        if scope is not None and scope.record is None:
            scope.record = record

    @staticmethod
    def current_link() -> SpanContext | None:
        """The span context to link a later flush to: the current scope's span."""
        scope = _scope.get()
        span = scope.span if scope is not None else None
        return span.get_span_context() if span is not None else None

    # ---------------------------------------------------------------- metrics

    def noted(self, record: Emission) -> None:
        """Count a record; an emission that left the outbox adds its time there."""
        instruments = self.instruments
        if instruments is None:
            return
        self._count(record.outcome, record.event_type)
        if record.buffered_for:
            instruments.buffer_duration.record(
                record.buffered_for, {GUARD: self.guard_name, OUTCOME: record.outcome.value}
            )

    def delivered(self, event_type: str | None) -> None:
        """Count a delivery that made no record (the traced fast path)."""
        if self.instruments is not None:
            self._count(Outcome.DELIVERED, event_type)

    def _count(self, outcome: Outcome, event_type: str | None) -> None:
        key = (outcome, event_type)
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1


def _describe(span: Span, record: Emission, error: BaseException | None, send: bool) -> None:
    outcome = record.outcome
    attributes: dict[str, str | float] = {OUTCOME: outcome.value}
    if record.seq:
        attributes[MESSAGE_ID] = str(record.seq)
    if send and record.waited:
        attributes[BARRIER_WAIT] = record.waited
    if record.buffered_for:
        attributes[BUFFER_DURATION] = record.buffered_for
    if record.reason and outcome not in (Outcome.DELIVERED, Outcome.FLUSHED):
        attributes[REASON] = record.reason
    if outcome is Outcome.BUFFERED:
        span.add_event("buffered", {REASON: record.reason or ""})
    elif outcome in _BAD:
        attributes[ERROR_TYPE] = _error_type(error) if error is not None else outcome.value
        span.set_status(Status(StatusCode.ERROR, record.reason))
    span.set_attributes(attributes)


def _error_type(error: BaseException) -> str:
    kind = type(error)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
