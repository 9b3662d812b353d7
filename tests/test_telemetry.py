"""OpenTelemetry: spans per emission, flush and settle; metrics; providers; suppression.

Everything runs against the real SDK with its in-memory span exporter and metric reader. The
global providers are never set here (that is once per process); the subprocess tests at the end
cover them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import context, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

import emitguard
from conftest import Records, Sink, settle
from emitguard import EmissionError, Guard
from emitguard.testing import ReferenceManager, SyncReferenceManager

SEND = "send threads/{thread_id}"
FLUSH = "flush threads/{thread_id}"


class Poison(Exception):
    """An error the test declares as poison: the send can never take the message."""


def event(kind: str) -> dict[str, Any]:
    return {"type": kind}


@pytest.fixture
def traced(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> Callable[..., Guard]:
    def make(**options: Any) -> Guard:
        options.setdefault("name", "g")
        return Guard(tracer_provider=tracer_provider, meter_provider=meter_provider, **options)

    return make


def finished(exporter: InMemorySpanExporter, name: str | None = None) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if name is None or s.name == name]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def points(reader: InMemoryMetricReader, metric: str) -> list[tuple[dict[str, Any], Any]]:
    """(attributes, value) per data point; a histogram's value is (count, sum)."""
    data = reader.get_metrics_data()
    found: list[tuple[dict[str, Any], Any]] = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for item in scope.metrics:
                if item.name != metric:
                    continue
                for point in item.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = (point.count, point.sum)  # type: ignore[union-attr]
                    found.append((dict(point.attributes or {}), value))
    return found


def counted(reader: InMemoryMetricReader) -> dict[tuple[str, str | None], int]:
    return {
        (a["emitguard.outcome"], a.get("emitguard.event_type")): v
        for a, v in points(reader, "emitguard.emissions")
        if a["emitguard.guard"] == "g"
    }


# ------------------------------------------------------------------ outcomes


async def test_delivered_span_follows_the_messaging_conventions(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced()
    guard.mark_connected("t1")
    assert await guard.send("t1", event("agent_started"), sink.for_thread("t1")) is True
    [span] = finished(exporter)
    assert span.name == SEND
    assert span.kind is SpanKind.PRODUCER
    assert attrs(span) == {
        "messaging.system": "emitguard",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "t1",
        "messaging.destination.template": "threads/{thread_id}",
        "messaging.message.id": "1",
        "emitguard.event_type": "agent_started",
        "emitguard.outcome": "delivered",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert not span.events
    assert not span.links
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.start_time <= span.end_time
    assert sink.types("t1") == ["agent_started"]


async def test_spans_nest_under_the_agent_span(
    traced: Callable[..., Guard],
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    sink: Sink,
) -> None:
    guard = traced(ready_timeout=5.0)
    tracer = tracer_provider.get_tracer("agent")
    with tracer.start_as_current_span("agent run") as agent:
        waiting = asyncio.create_task(
            guard.send("t1", event("agent_started"), sink.for_thread("t1"))
        )
        await settle()
        guard.mark_connected("t1")
        assert await waiting
        assert await guard.send("t1", event("agent_thinking"), sink.for_thread("t1"))
    agent_context = agent.get_span_context()
    sends = finished(exporter, SEND)
    assert [attrs(s)["emitguard.event_type"] for s in sends] == ["agent_started", "agent_thinking"]
    for span in sends:
        assert span.parent is not None
        assert span.parent.span_id == agent_context.span_id
        assert span.context is not None
        assert span.context.trace_id == agent_context.trace_id


async def test_a_waiting_send_is_current_while_the_original_runs(
    traced: Callable[..., Guard], tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = tracer_provider.get_tracer("manager")

    async def deliver(message: Any) -> bool:
        with tracer.start_as_current_span("websocket send"):
            return True

    guard = traced(ready_timeout=5.0)
    waiting = asyncio.create_task(guard.send("t1", event("agent_started"), deliver))
    await asyncio.sleep(0.02)
    guard.mark_connected("t1")
    assert await waiting
    [inner] = finished(exporter, "websocket send")
    [send] = finished(exporter, SEND)
    assert inner.parent is not None
    assert send.context is not None
    assert inner.parent.span_id == send.context.span_id
    assert attrs(send)["emitguard.barrier.wait"] >= 0.015


async def test_barrier_wait_is_a_span_attribute_and_a_histogram(
    traced: Callable[..., Guard],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    sink: Sink,
) -> None:
    guard = traced(ready_timeout=5.0)
    waiting = asyncio.create_task(guard.send("t1", event("agent_started"), sink.for_thread("t1")))
    await asyncio.sleep(0.03)
    guard.mark_connected("t1")
    assert await waiting
    [span] = finished(exporter)
    assert attrs(span)["emitguard.outcome"] == "delivered"
    assert 0.025 <= attrs(span)["emitguard.barrier.wait"] < 1.0
    [(labels, (count, total))] = points(reader, "emitguard.barrier.wait")
    assert labels == {"emitguard.guard": "g", "emitguard.outcome": "delivered"}
    assert count == 1
    assert total == pytest.approx(attrs(span)["emitguard.barrier.wait"])


async def test_buffered_then_flushed_gets_a_flush_span_linked_to_the_send(
    traced: Callable[..., Guard],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    sink: Sink,
) -> None:
    guard = traced()
    guard.mark_disconnected("t1", "socket closed")
    assert await guard.send("t1", event("tool_executing"), sink.for_thread("t1"))
    [send] = finished(exporter)
    assert attrs(send)["emitguard.outcome"] == "buffered"
    assert attrs(send)["emitguard.reason"] == "thread disconnected: socket closed"
    assert [e.name for e in send.events] == ["buffered"]
    assert send.status.status_code is StatusCode.UNSET
    assert dict(points(reader, "emitguard.outbox.size")[0][0]) == {"emitguard.guard": "g"}
    assert points(reader, "emitguard.outbox.size")[0][1] == 1

    await asyncio.sleep(0.01)
    guard.mark_connected("t1")
    assert await guard.drain(1.0) == 0
    [flush] = finished(exporter, FLUSH)
    assert flush.kind is SpanKind.PRODUCER
    assert attrs(flush)["messaging.operation.type"] == "send"
    assert attrs(flush)["messaging.operation.name"] == "flush"
    assert attrs(flush)["messaging.message.id"] == "1"
    assert attrs(flush)["emitguard.outcome"] == "flushed"
    assert attrs(flush)["emitguard.buffer.duration"] >= 0.009
    assert send.context is not None
    [link] = flush.links
    assert link.context.span_id == send.context.span_id
    assert link.context.trace_id == send.context.trace_id
    assert sink.types("t1") == ["tool_executing"]

    assert counted(reader) == {("buffered", "tool_executing"): 1, ("flushed", "tool_executing"): 1}
    [(labels, (count, _))] = points(reader, "emitguard.buffer.duration")
    assert labels == {"emitguard.guard": "g", "emitguard.outcome": "flushed"}
    assert count == 1
    assert points(reader, "emitguard.outbox.size")[0][1] == 0


async def test_a_failed_flush_attempt_keeps_the_event_buffered(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced(retry_backoff=())
    guard.mark_disconnected("t1")
    assert await guard.send("t1", event("agent_thinking"), sink.for_thread("t1"))
    sink.down.add("t1")
    guard.mark_connected("t1")
    await guard.drain(0.5)
    [attempt] = finished(exporter, FLUSH)
    assert attrs(attempt)["emitguard.outcome"] == "buffered"
    assert attrs(attempt)["emitguard.reason"] == "flush failed: send returned False"
    assert [e.name for e in attempt.events] == ["buffered"]
    sink.down.clear()
    guard.mark_connected("t1")
    assert await guard.drain(0.5) == 0
    assert [attrs(s)["emitguard.outcome"] for s in finished(exporter, FLUSH)] == [
        "buffered",
        "flushed",
    ]


async def test_dropped_newest_is_an_error_on_its_send_span(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced(max_per_thread=1, overflow="drop_newest")
    guard.mark_disconnected("t1")
    assert await guard.send("t1", event("agent_started"), sink.for_thread("t1")) is True
    assert await guard.send("t1", event("agent_thinking"), sink.for_thread("t1")) is False
    first, second = finished(exporter)
    assert attrs(first)["emitguard.outcome"] == "buffered"
    assert attrs(second)["emitguard.outcome"] == "dropped"
    assert attrs(second)["error.type"] == "dropped"
    assert "outbox full, max_per_thread=1" in attrs(second)["emitguard.reason"]
    assert second.status.status_code is StatusCode.ERROR
    assert second.status.description == attrs(second)["emitguard.reason"]


async def test_an_evicted_event_gets_a_drop_span_linked_to_its_send(
    traced: Callable[..., Guard],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    sink: Sink,
) -> None:
    guard = traced(max_per_thread=1)
    guard.mark_disconnected("t1")
    assert await guard.send("t1", event("agent_started"), sink.for_thread("t1"))
    assert await guard.send("t1", event("agent_thinking"), sink.for_thread("t1"))
    first_send, drop, second_send = finished(exporter)
    assert drop.name == "drop threads/{thread_id}"
    assert drop.kind is SpanKind.INTERNAL
    assert attrs(drop)["messaging.operation.type"] == "settle"
    assert attrs(drop)["messaging.operation.name"] == "drop"
    assert attrs(drop)["messaging.message.id"] == "1"
    assert attrs(drop)["emitguard.outcome"] == "dropped"
    assert attrs(drop)["error.type"] == "dropped"
    assert drop.status.status_code is StatusCode.ERROR
    assert first_send.context is not None
    assert [link.context.span_id for link in drop.links] == [first_send.context.span_id]
    assert attrs(second_send)["emitguard.outcome"] == "buffered"
    assert counted(reader) == {
        ("buffered", "agent_started"): 1,
        ("dropped", "agent_started"): 1,
        ("buffered", "agent_thinking"): 1,
    }


async def test_an_expired_event_gets_an_expire_span(
    traced: Callable[..., Guard],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    sink: Sink,
) -> None:
    guard = traced(ttl=0.05)
    guard.mark_disconnected("t1")
    assert await guard.send("t1", event("agent_started"), sink.for_thread("t1"))
    for _ in range(100):
        if len(finished(exporter)) == 2:
            break
        await asyncio.sleep(0.01)
    send, expire = finished(exporter)
    assert expire.name == "expire threads/{thread_id}"
    assert attrs(expire)["messaging.operation.name"] == "expire"
    assert attrs(expire)["emitguard.outcome"] == "expired"
    assert attrs(expire)["error.type"] == "expired"
    assert attrs(expire)["emitguard.reason"] == "expired after ttl=0.05s in the outbox"
    assert attrs(expire)["emitguard.buffer.duration"] >= 0.05
    assert expire.status.status_code is StatusCode.ERROR
    assert send.context is not None
    assert [link.context.span_id for link in expire.links] == [send.context.span_id]
    assert counted(reader)[("expired", "agent_started")] == 1


async def test_a_poison_exception_fails_the_span_and_is_recorded(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter
) -> None:
    async def deliver(message: Any) -> bool:
        raise Poison("cannot serialise")

    guard = traced(poison=(Poison,))
    guard.mark_connected("t1")
    assert await guard.send("t1", event("agent_completed"), deliver) is False
    [span] = finished(exporter)
    assert attrs(span)["emitguard.outcome"] == "failed"
    assert attrs(span)["error.type"] == f"{__name__}.Poison"
    assert span.status.status_code is StatusCode.ERROR
    [exception] = span.events
    assert exception.name == "exception"
    assert dict(exception.attributes or {})["exception.type"] == f"{__name__}.Poison"
    assert dict(exception.attributes or {})["exception.message"] == "cannot serialise"


async def test_a_builtin_poison_on_the_general_path(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter
) -> None:
    async def deliver(message: Any) -> bool:
        raise TypeError("Object of type set is not JSON serializable")

    guard = traced(ready_timeout=5.0)
    waiting = asyncio.create_task(guard.send("t1", event("agent_completed"), deliver))
    await settle()
    guard.mark_connected("t1")
    assert await waiting is False
    [span] = finished(exporter)
    assert (attrs(span)["emitguard.outcome"], attrs(span)["error.type"]) == ("failed", "TypeError")
    assert [e.name for e in span.events] == ["exception"]


async def test_a_transport_error_is_recorded_but_the_event_waits(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced()
    guard.mark_connected("t1")
    sink.raise_on.add("t1")
    assert await guard.send("t1", event("agent_thinking"), sink.for_thread("t1")) is True
    [span] = finished(exporter)
    assert attrs(span)["emitguard.outcome"] == "buffered"
    assert "error.type" not in attrs(span)
    assert span.status.status_code is StatusCode.UNSET
    assert [e.name for e in span.events] == ["exception", "buffered"]
    sink.raise_on.clear()
    guard.mark_connected("t1")
    assert await guard.drain(0.5) == 0
    assert sink.types("t1") == ["agent_thinking"]


async def test_a_falsy_return_on_the_fast_path_buffers(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced(retry_backoff=())
    guard.mark_connected("t1")
    sink.down.add("t1")
    assert await guard.send("t1", event("agent_thinking"), sink.for_thread("t1")) is True
    [span] = finished(exporter)
    assert attrs(span)["emitguard.outcome"] == "buffered"
    assert attrs(span)["emitguard.reason"] == "send returned False"
    assert attrs(span)["messaging.message.id"] == "1"


async def test_rejected_input_is_an_error_span(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced()
    assert await guard.send("", event("agent_started"), sink.for_thread("")) is False
    [span] = finished(exporter)
    assert attrs(span)["emitguard.outcome"] == "rejected"
    assert attrs(span)["error.type"] == "rejected"
    assert attrs(span)["emitguard.reason"] == (
        "thread_id must be a hashable id (str, int, UUID, tuple, ...), got an empty str"
    )
    assert "messaging.message.id" not in attrs(span)
    assert span.status.status_code is StatusCode.ERROR


async def test_strict_mode_raises_and_still_ends_the_span(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced(strict=True)
    with pytest.raises(EmissionError):
        await guard.send("t1", None, sink.for_thread("t1"))
    [span] = finished(exporter)
    assert attrs(span)["emitguard.outcome"] == "rejected"


async def test_a_cancelled_waiting_send_ends_its_span_as_buffered(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced(ready_timeout=5.0)
    waiting = asyncio.create_task(guard.send("t1", event("agent_started"), sink.for_thread("t1")))
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    [span] = finished(exporter)
    assert attrs(span)["emitguard.outcome"] == "buffered"
    assert "cancelled" in attrs(span)["emitguard.reason"]


async def test_sync_sends_are_traced(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    manager = SyncReferenceManager()
    emitguard.guard(manager, tracer_provider=tracer_provider)
    try:
        manager.connect("u1")
        manager.update_connection_thread("u1", "t1")
        assert manager.send_to_thread("t1", event("agent_started")) is True
        manager.disconnect_user("u1")
        assert manager.send_to_thread("t1", event("agent_thinking")) is True
    finally:
        emitguard.unguard(manager)
    assert [attrs(s)["emitguard.outcome"] for s in finished(exporter)] == [
        "delivered",
        "buffered",
    ]


# ------------------------------------------------------------ switches and providers


async def test_without_an_sdk_the_guard_is_not_active(sink: Sink) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    guard = Guard()
    assert guard.telemetry_active is False
    guard.mark_connected("t1")
    assert await guard.send("t1", event("agent_started"), sink.for_thread("t1"))
    assert Guard(tracer_provider=trace.NoOpTracerProvider()).telemetry_active is False


async def test_suppressed_instrumentation_makes_no_spans_but_counts(
    traced: Callable[..., Guard],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    sink: Sink,
) -> None:
    guard = traced(ready_timeout=5.0)
    token = context.attach(context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        waiting = asyncio.create_task(
            guard.send("t1", event("agent_started"), sink.for_thread("t1"))
        )
        await settle()
        guard.mark_connected("t1")
        assert await waiting
        assert await guard.send("t1", event("agent_thinking"), sink.for_thread("t1"))
    finally:
        context.detach(token)
    assert finished(exporter) == []
    assert sink.types("t1") == ["agent_started", "agent_thinking"]
    assert counted(reader) == {
        ("delivered", "agent_started"): 1,
        ("delivered", "agent_thinking"): 1,
    }
    assert await guard.send("t1", event("agent_completed"), sink.for_thread("t1"))
    assert len(finished(exporter)) == 1


async def test_injected_providers_are_used_and_the_globals_are_not(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider, sink: Sink
) -> None:
    other = InMemorySpanExporter()
    other_provider = TracerProvider()
    other_provider.add_span_processor(SimpleSpanProcessor(other))
    first = Guard(tracer_provider=tracer_provider)
    second = Guard(tracer_provider=other_provider)
    for guard in (first, second):
        guard.mark_connected("t1")
    assert await first.send("t1", event("a"), sink.for_thread("t1"))
    assert await second.send("t1", event("b"), sink.for_thread("t1"))
    assert [attrs(s)["emitguard.event_type"] for s in finished(exporter)] == ["a"]
    assert [attrs(s)["emitguard.event_type"] for s in other.get_finished_spans()] == ["b"]
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    other_provider.shutdown()


async def test_tracing_false_keeps_metrics_and_metrics_false_keeps_spans(
    traced: Callable[..., Guard],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    sink: Sink,
) -> None:
    quiet = traced(tracing=False)
    assert quiet.telemetry_active
    quiet.mark_connected("t1")
    assert await quiet.send("t1", event("agent_started"), sink.for_thread("t1"))
    assert finished(exporter) == []
    assert counted(reader) == {("delivered", "agent_started"): 1}

    spans_only = traced(metrics=False, name="spans-only")
    spans_only.mark_connected("t1")
    assert await spans_only.send("t1", event("agent_started"), sink.for_thread("t1"))
    assert len(finished(exporter)) == 1
    guards = {a["emitguard.guard"] for a, _ in points(reader, "emitguard.emissions")}
    assert guards == {"g"}

    off = traced(tracing=False, metrics=False)
    assert off.telemetry_active is False


async def test_guard_unguard_guard_traces_only_while_guarded(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    manager = ReferenceManager()
    manager.connect("u1")

    async def agent_emits(kind: str) -> None:
        manager.update_connection_thread("u1", "t1")
        assert await manager.send_to_thread("t1", event(kind))

    emitguard.guard(manager, tracer_provider=tracer_provider)
    await agent_emits("first")
    emitguard.unguard(manager)
    await agent_emits("unguarded")
    emitguard.guard(manager, tracer_provider=tracer_provider)
    try:
        await agent_emits("second")
    finally:
        emitguard.unguard(manager)
    assert [attrs(s)["emitguard.event_type"] for s in finished(exporter)] == ["first", "second"]
    assert [m["type"] for m in manager.received("t1")] == ["first", "unguarded", "second"]


async def test_span_hook_adds_attributes_and_cannot_break_a_send(
    traced: Callable[..., Guard],
    exporter: InMemorySpanExporter,
    sink: Sink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[str, Any]] = []

    def hook(span: trace.Span, thread_id: str, message: Any) -> None:
        seen.append((thread_id, message))
        span.set_attribute("app.run_id", message["run"])

    guard = traced(span_hook=hook, ready_timeout=5.0)
    waiting = asyncio.create_task(
        guard.send("t1", {"type": "a", "run": "r1"}, sink.for_thread("t1"))
    )
    await settle()
    guard.mark_connected("t1")
    assert await waiting
    assert await guard.send("t1", {"type": "b", "run": "r2"}, sink.for_thread("t1"))
    assert [attrs(s)["app.run_id"] for s in finished(exporter)] == ["r1", "r2"]
    assert [t for t, _ in seen] == ["t1", "t1"]

    def broken(span: trace.Span, thread_id: str, message: Any) -> None:
        raise RuntimeError("hook bug")

    faulty = traced(span_hook=broken, name="faulty")
    faulty.mark_connected("t1")
    with caplog.at_level(logging.DEBUG, logger="emitguard"):
        assert await faulty.send("t1", event("c"), sink.for_thread("t1"))
        assert await faulty.send("t1", event("d"), sink.for_thread("t1"))
    levels = [r.levelno for r in caplog.records if "span_hook" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG]
    assert sink.types("t1")[-2:] == ["c", "d"]
    assert [attrs(s)["emitguard.outcome"] for s in finished(exporter)][-2:] == [
        "delivered",
        "delivered",
    ]


async def test_a_span_that_is_not_recording_gets_no_hook(sink: Sink) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    calls: list[str] = []
    guard = Guard(tracer_provider=provider, span_hook=lambda span, t, m: calls.append(t))
    assert guard.telemetry_active
    guard.mark_disconnected("t1")
    assert await guard.send("t1", event("a"), sink.for_thread("t1"))
    guard.mark_connected("t1")
    assert await guard.drain(0.5) == 0
    assert await guard.send("t1", event("b"), sink.for_thread("t1"))
    assert calls == []
    assert exporter.get_finished_spans() == ()
    assert sink.types("t1") == ["a", "b"]


async def test_guards_of_one_name_add_up_and_closed_guards_keep_their_counts(
    traced: Callable[..., Guard], reader: InMemoryMetricReader, sink: Sink
) -> None:
    first, second = traced(), traced()
    for guard in (first, second):
        guard.mark_connected("t1")
        assert await guard.send("t1", event("a"), sink.for_thread("t1"))
    assert counted(reader) == {("delivered", "a"): 2}
    await first.aclose()
    await second.aclose()
    assert counted(reader) == {("delivered", "a"): 2}  # a cumulative counter never goes down


def test_bad_telemetry_options_are_refused() -> None:
    with pytest.raises(TypeError, match="tracing must be a bool, got 'no'"):
        Guard(tracing="no")
    with pytest.raises(ValueError, match="destination_template must be a non-empty str"):
        Guard(destination_template="")
    with pytest.raises(TypeError, match="span_hook must be callable or None, got 3"):
        Guard(span_hook=3)


async def test_destination_template_names_the_spans(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced(destination_template="conversation/{id}")
    guard.mark_connected("t1")
    assert await guard.send("t1", event("a"), sink.for_thread("t1"))
    [span] = finished(exporter)
    assert span.name == "send conversation/{id}"
    assert attrs(span)["messaging.destination.template"] == "conversation/{id}"


# ------------------------------------------------------------- global providers


GLOBAL_SDK = textwrap.dedent(
    """
    import asyncio, json
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import emitguard
    from emitguard.testing import ReferenceManager

    async def main():
        manager = ReferenceManager()
        guard = emitguard.guard(manager)
        before = guard.telemetry_active
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        manager.connect("u1")
        manager.update_connection_thread("u1", "t1")
        await manager.send_to_thread("t1", {"type": "agent_started"})
        print(json.dumps({
            "before": before,
            "after": guard.telemetry_active,
            "spans": [s.name for s in exporter.get_finished_spans()],
        }))

    asyncio.run(main())
    """
)


def run_script(code: str, **env: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_global_sdk_set_after_guarding_is_used_from_the_next_association() -> None:
    assert run_script(GLOBAL_SDK) == {"before": False, "after": True, "spans": [SEND]}


def test_a_disabled_sdk_records_nothing() -> None:
    found = run_script(GLOBAL_SDK, OTEL_SDK_DISABLED="true")
    assert found == {"before": False, "after": False, "spans": []}


async def test_with_a_listener_every_send_has_a_record_and_a_span(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, records: Records, sink: Sink
) -> None:
    guard = traced(stamp_seq="seq")
    records.guard = guard
    guard.mark_connected("t1")
    for kind in ("agent_started", "agent_thinking"):
        assert await guard.send("t1", event(kind), sink.for_thread("t1"))
    assert [(r.outcome.value, r.seq) for r in records.items] == [("delivered", 1), ("delivered", 2)]
    assert [
        (attrs(s)["emitguard.outcome"], attrs(s)["messaging.message.id"])
        for s in finished(exporter)
    ] == [
        ("delivered", "1"),
        ("delivered", "2"),
    ]
    assert [m["seq"] for m in sink.received["t1"]] == [1, 2]


async def test_the_ttl_sweep_inherits_neither_span_nor_suppression(
    traced: Callable[..., Guard],
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    sink: Sink,
) -> None:
    guard = traced(ttl=0.05)
    guard.mark_disconnected("t1")
    guard.mark_disconnected("t2")
    tracer = tracer_provider.get_tracer("agent")
    with tracer.start_as_current_span("agent run"):
        token = context.attach(context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:  # this send starts the sweep
            assert await guard.send("t1", event("a"), sink.for_thread("t1"))
        finally:
            context.detach(token)
    assert await guard.send("t2", event("b"), sink.for_thread("t2"))
    for _ in range(100):
        if len(finished(exporter, "expire threads/{thread_id}")) == 2:
            break
        await asyncio.sleep(0.01)
    expired = finished(exporter, "expire threads/{thread_id}")
    assert sorted(attrs(s)["messaging.destination.name"] for s in expired) == ["t1", "t2"]
    assert [s.parent for s in expired] == [None, None]


async def test_a_flush_span_does_not_carry_the_barrier_wait(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced(ready_timeout=0.02, retry_backoff=())
    assert await guard.send("t1", event("a"), sink.for_thread("t1"))  # waits, then buffered
    sink.down.add("t1")
    guard.mark_connected("t1")
    await guard.drain(0.2)
    send, retry = finished(exporter)
    assert attrs(send)["emitguard.barrier.wait"] >= 0.015
    assert attrs(retry)["emitguard.outcome"] == "buffered"
    assert "emitguard.barrier.wait" not in attrs(retry)


def test_a_tracer_set_up_after_the_meter_is_still_found() -> None:
    code = GLOBAL_SDK.replace(
        "guard = emitguard.guard(manager)",
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "    guard = emitguard.guard(manager, meter_provider=MeterProvider())",
    )
    assert run_script(code) == {"before": True, "after": True, "spans": [SEND]}


async def test_an_entry_with_no_send_gets_a_fail_span(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    class DataOnly(emitguard.MemoryOutbox):
        """A backend that stores data only (no way to call the original send)."""

        async def push(self, entry: emitguard.OutboxEntry) -> None:
            entry.deliver = None
            await super().push(entry)

    guard = traced(outbox=DataOnly())
    guard.mark_disconnected("t1")
    assert await guard.send("t1", event("a"), sink.for_thread("t1"))
    guard.mark_connected("t1")
    assert await guard.drain(0.5) == 0
    send, fail = finished(exporter)
    assert fail.name == "fail threads/{thread_id}"
    assert attrs(fail)["messaging.operation.type"] == "settle"
    assert attrs(fail)["emitguard.outcome"] == "failed"
    assert attrs(fail)["emitguard.reason"] == "no send to deliver it with"
    assert send.context is not None
    assert [link.context.span_id for link in fail.links] == [send.context.span_id]


async def test_a_send_cancelled_during_a_fast_delivery_is_buffered_under_its_span(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    gate = asyncio.Event()

    async def stuck(message: Any) -> bool:
        await gate.wait()
        return True

    guard = traced()
    guard.mark_connected("t1")
    sending = asyncio.create_task(guard.send("t1", event("a"), stuck))
    await settle()
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    [span] = finished(exporter)
    assert attrs(span)["emitguard.outcome"] == "buffered"
    assert attrs(span)["emitguard.reason"] == "sender cancelled during send"
    assert attrs(span)["messaging.message.id"] == "1"


async def test_a_send_queued_behind_a_fast_delivery_follows_it(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter
) -> None:
    gate = asyncio.Event()
    got: list[str] = []

    async def deliver(message: Any) -> bool:
        if message["type"] == "first":
            await gate.wait()
        got.append(message["type"])
        return True

    guard = traced()
    guard.mark_connected("t1")
    first = asyncio.create_task(guard.send("t1", event("first"), deliver))
    await settle()
    second = asyncio.create_task(guard.send("t1", event("second"), deliver))
    await settle()
    gate.set()
    assert await asyncio.gather(first, second) == [True, True]
    assert got == ["first", "second"]
    assert sorted(
        (attrs(s)["messaging.message.id"], attrs(s)["emitguard.outcome"])
        for s in finished(exporter)
    ) == [("1", "delivered"), ("2", "delivered")]


class BrokenOutbox(emitguard.MemoryOutbox):
    """An outbox whose storage fails: an emitguard fault, not the host's."""

    async def push(self, entry: emitguard.OutboxEntry) -> None:
        raise RuntimeError("disk full")


async def test_an_internal_fault_is_a_failed_span_not_an_exception(
    traced: Callable[..., Guard], exporter: InMemorySpanExporter, sink: Sink
) -> None:
    guard = traced(outbox=BrokenOutbox())
    guard.mark_disconnected("t1")
    assert await guard.send("t1", event("a"), sink.for_thread("t1")) is False
    assert guard.send_sync("t1", event("b"), lambda message: True) is False
    spans = finished(exporter)
    assert [attrs(s)["emitguard.outcome"] for s in spans] == ["failed", "failed"]
    for span in spans:
        assert attrs(span)["emitguard.reason"] == (
            "emitguard internal error: RuntimeError: disk full"
        )
        assert span.status.status_code is StatusCode.ERROR
