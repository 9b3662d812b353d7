"""``EmitguardInstrumentor``: instrument / uninstrument / instrument again with the real SDK
(in-memory exporter and reader), a global SDK configured after guarding (subprocess: the global
providers are set once per process), and ``opentelemetry-instrument python app.py``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import emitguard
from emitguard import _live
from emitguard._telemetry import INSTRUMENTATION
from emitguard.instrumentation import EmitguardInstrumentor
from emitguard.testing import ReferenceManager, SyncReferenceManager

SEND = "send threads/{thread_id}"


@pytest.fixture
def instrumentor() -> Iterator[EmitguardInstrumentor]:
    """The (singleton) instrumentor; the process is left as never instrumented after."""
    yield EmitguardInstrumentor()
    if EmitguardInstrumentor().is_instrumented_by_opentelemetry:
        EmitguardInstrumentor().uninstrument()
    INSTRUMENTATION.set(None)
    for guard in _live.guards():
        guard.refresh()


def emissions(reader: InMemoryMetricReader, guard: str) -> dict[str, int]:
    data = reader.get_metrics_data()
    found: dict[str, int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "emitguard.emissions":
                    continue
                for point in metric.data.data_points:
                    attributes = dict(point.attributes or {})
                    if attributes["emitguard.guard"] == guard:
                        outcome = str(attributes["emitguard.outcome"])
                        found[outcome] = found.get(outcome, 0) + point.value  # type: ignore[union-attr]
    return found


def connected(name: str) -> tuple[ReferenceManager, emitguard.Guard]:
    manager = ReferenceManager()
    guard = emitguard.guard(manager, name=name)
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    return manager, guard


def test_it_is_a_base_instrumentor_registered_for_opentelemetry_instrument() -> None:
    assert isinstance(EmitguardInstrumentor(), BaseInstrumentor)
    assert EmitguardInstrumentor() is EmitguardInstrumentor()  # a singleton, as they all are
    assert list(EmitguardInstrumentor().instrumentation_dependencies()) == []
    [entry] = [
        e
        for e in importlib.metadata.entry_points(group="opentelemetry_instrumentor")
        if e.name == "emitguard"
    ]
    assert entry.value == "emitguard.instrumentation:EmitguardInstrumentor"
    assert entry.load() is EmitguardInstrumentor


async def test_instrument_uninstrument_instrument(
    instrumentor: EmitguardInstrumentor,
    tracer_provider: TracerProvider,
    meter_provider: MeterProvider,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
) -> None:
    manager, guard = connected("early")  # guarded before anything is instrumented
    assert not guard.telemetry_active
    assert await manager.send_to_thread("t1", {"type": "untraced"})

    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    assert instrumentor.is_instrumented_by_opentelemetry
    assert guard.telemetry_active  # the live guard took the providers at once
    assert await manager.send_to_thread("t1", {"type": "traced"})
    late_manager, late = connected("late")  # a guard made while instrumented
    assert await late_manager.send_to_thread("t1", {"type": "traced too"})
    sent = [(s.name, dict(s.attributes or {})) for s in exporter.get_finished_spans()]
    assert [(name, a["emitguard.event_type"]) for name, a in sent] == [
        (SEND, "traced"),
        (SEND, "traced too"),
    ]
    assert emissions(reader, "early") == {"delivered": 1}
    assert emissions(reader, "late") == {"delivered": 1}

    instrumentor.uninstrument()
    assert not guard.telemetry_active
    assert not late.telemetry_active
    exporter.clear()
    assert await manager.send_to_thread("t1", {"type": "off"})
    assert await late_manager.send_to_thread("t1", {"type": "off"})
    own = emitguard.Guard(tracer_provider=tracer_provider)  # even with providers of its own
    assert not own.telemetry_active
    assert exporter.get_finished_spans() == ()
    assert emissions(reader, "early") == {}  # uninstrumented guards report no metric

    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    assert await manager.send_to_thread("t1", {"type": "again"})
    assert [s.attributes["emitguard.event_type"] for s in exporter.get_finished_spans()] == [
        "again"
    ]
    assert own.telemetry_active
    assert emissions(reader, "early") == {"delivered": 2}  # the sends made while off: uncounted
    # every send reached the socket, traced or not
    assert [m["type"] for m in manager.received("t1")] == ["untraced", "traced", "off", "again"]
    await own.aclose()
    emitguard.unguard(manager)
    emitguard.unguard(late_manager)


async def test_a_guard_s_own_providers_win_over_the_instrumentor_s(
    instrumentor: EmitguardInstrumentor,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    mine = InMemorySpanExporter()
    own_provider = TracerProvider()
    own_provider.add_span_processor(SimpleSpanProcessor(mine))
    instrumentor.instrument(tracer_provider=tracer_provider)
    manager = ReferenceManager()
    emitguard.guard(manager, tracer_provider=own_provider)
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    assert await manager.send_to_thread("t1", {"type": "a"})
    assert [s.name for s in mine.get_finished_spans()] == [SEND]
    assert exporter.get_finished_spans() == ()
    emitguard.unguard(manager)
    own_provider.shutdown()


def test_instrumented_sync_sends_are_traced(
    instrumentor: EmitguardInstrumentor,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    manager = SyncReferenceManager()
    emitguard.guard(manager)
    manager.connect("u1")
    manager.update_connection_thread("u1", "t1")
    instrumentor.instrument(tracer_provider=tracer_provider)
    assert manager.send_to_thread("t1", {"type": "a"})
    assert [s.name for s in exporter.get_finished_spans()] == [SEND]
    emitguard.unguard(manager)


# ----------------------------------------------- a global SDK configured after guarding

LATER_SDK = textwrap.dedent(
    """
    import asyncio, json, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import emitguard
    from emitguard.testing import ReferenceManager

    async def main(instrumented):
        if instrumented:
            from emitguard.instrumentation import EmitguardInstrumentor
            EmitguardInstrumentor().instrument()
        manager = ReferenceManager()
        emitguard.guard(manager)
        manager.connect("u1")
        manager.update_connection_thread("u1", "t1")  # the last association
        await manager.send_to_thread("t1", {"type": "before the SDK"})
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)  # configured later, e.g. in a lifespan
        await manager.send_to_thread("t1", {"type": "after the SDK"})
        print(json.dumps([
            s.attributes["emitguard.event_type"] for s in exporter.get_finished_spans()
        ]))

    asyncio.run(main(sys.argv[1] == "instrumented"))
    """
)


def run_script(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("mode", "spans"),
    [("instrumented", ["after the SDK"]), ("not instrumented", [])],
)
def test_an_sdk_configured_after_guarding_traces_the_next_send(
    mode: str, spans: list[str]
) -> None:
    """Instrumented, the very next send is traced. Without the instrumentor the guard only
    looks again at the next association (or ``guard.refresh()``), as documented."""
    out = run_script(sys.executable, "-W", "error", "-c", LATER_SDK, mode)
    assert json.loads(out.strip().splitlines()[-1]) == spans


# ---------------------------------------------------------- opentelemetry-instrument

APP = textwrap.dedent(
    """
    # A guarded app with no OpenTelemetry code: only the guard line.
    import asyncio
    import emitguard
    from emitguard.testing import ReferenceManager

    async def main():
        manager = ReferenceManager()
        emitguard.guard(manager)
        manager.connect("user-1")
        first = asyncio.create_task(manager.send_to_thread("thread-1", {"type": "agent_started"}))
        await asyncio.sleep(0.01)
        manager.update_connection_thread("user-1", "thread-1")  # the late association
        assert await first
        assert await manager.send_to_thread("thread-1", {"type": "agent_completed"})

    asyncio.run(main())

    from emitguard.instrumentation import EmitguardInstrumentor  # (for the test only)
    print("instrumented:", EmitguardInstrumentor().is_instrumented_by_opentelemetry)
    """
)


def _console_spans(out: str) -> list[dict[str, Any]]:
    """The JSON objects the console exporter printed, one per span."""
    decoder = json.JSONDecoder()
    spans, at = [], out.find("{")
    while at != -1:
        span, end = decoder.raw_decode(out, at)
        spans.append(span)
        at = out.find("{", end)
    return spans


@pytest.mark.parametrize("disabled", [False, True])
def test_opentelemetry_instrument_runs_a_guarded_app(tmp_path: Path, disabled: bool) -> None:
    command = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))
    assert command, "the dev extra installs opentelemetry-distro (opentelemetry-instrument)"
    (tmp_path / "app.py").write_text(APP, encoding="utf-8")
    env = {"OTEL_SERVICE_NAME": "guarded-app", "PYTHONPATH": ""}
    if disabled:
        env["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = "emitguard"
    out = run_script(
        command,
        "--traces_exporter",
        "console",
        "--metrics_exporter",
        "none",
        "--logs_exporter",
        "none",
        sys.executable,
        "app.py",
        env=env,
        cwd=tmp_path,
    )
    assert re.search(r"^instrumented: (\w+)$", out, re.MULTILINE)[1] == str(not disabled)  # type: ignore[index]
    spans = _console_spans(out)
    if disabled:  # OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=emitguard: no span from any guard
        assert spans == []
        return
    assert [
        (s["name"], s["attributes"]["emitguard.event_type"], s["attributes"]["emitguard.outcome"])
        for s in spans
    ] == [
        (SEND, "agent_started", "delivered"),
        (SEND, "agent_completed", "delivered"),
    ]
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"guarded-app"}
    assert spans[0]["attributes"]["emitguard.barrier.wait"] > 0
