"""Shared test helpers: a recording sink for guard deliveries and a record collector."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import emitguard
from emitguard import Emission, Guard, Outcome
from redis_support import RedisCluster, RedisServer, serve, serve_cluster


class Sink:
    """A stand-in socket per thread: records what it received, can be taken down."""

    def __init__(self) -> None:
        self.received: dict[str, list[Any]] = {}
        self.down: set[str] = set()
        self.raise_on: set[str] = set()
        self.calls = 0

    def for_thread(self, thread_id: str) -> Any:
        async def deliver(message: Any) -> bool:
            return self.deliver_now(thread_id, message)

        return deliver

    def deliver_now(self, thread_id: str, message: Any) -> bool:
        self.calls += 1
        if thread_id in self.raise_on:
            raise ConnectionError(f"socket of {thread_id} broke")
        if thread_id in self.down:
            return False
        self.received.setdefault(thread_id, []).append(message)
        return True

    def types(self, thread_id: str) -> list[str]:
        return [m["type"] for m in self.received.get(thread_id, [])]


class Records:
    """Collects every emission record of one guard through the public hook."""

    def __init__(self, guard: Guard | None = None) -> None:
        self.guard = guard
        self.items: list[Emission] = []

    @emitguard.hookimpl
    def emitguard_emission(self, emission: Emission, guard: Guard) -> None:
        if self.guard is None or guard is self.guard:
            self.items.append(emission)

    def outcomes(self, thread_id: str | None = None) -> list[Outcome]:
        return [r.outcome for r in self.items if thread_id is None or r.thread_id == thread_id]

    def of(self, outcome: Outcome) -> list[Emission]:
        return [r for r in self.items if r.outcome is outcome]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--scale",
        type=float,
        default=None,
        help="size factor of the load-and-fault test (default: $EMITGUARD_SCALE or 1; "
        "1 is a few seconds, 5 is 10,000 threads)",
    )


@pytest.fixture
def scale(request: pytest.FixtureRequest) -> float:
    """Size factor for load tests: ``--scale``, else ``$EMITGUARD_SCALE``, else 1."""
    value = request.config.getoption("scale")
    if value is None:
        value = float(os.environ.get("EMITGUARD_SCALE", "1"))
    if value <= 0:
        raise pytest.UsageError(f"--scale must be > 0, got {value!r}")
    return float(value)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of this test alone, on a free port (``tests/redis_support.py``)."""
    yield from serve(tmp_path)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A 3-node Redis Cluster of this test alone, on free ports (``tests/redis_support.py``)."""
    yield from serve_cluster(tmp_path)


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def records() -> Iterator[Records]:
    collector = Records()
    emitguard.register(collector)
    try:
        yield collector
    finally:
        emitguard.unregister(collector)


async def settle(rounds: int = 5) -> None:
    """Let scheduled callbacks and tasks run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def eventually(condition: Callable[[], object], seconds: float = 5.0) -> None:
    """Wait until ``condition()`` holds (real servers take their time); fail after
    ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still false after {seconds}s: {condition}")


# ------------------------------------------- OpenTelemetry SDK parts (in memory)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()
