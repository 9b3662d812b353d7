"""emitguard benchmarks: ratios measured side by side in one run.

    python benchmarks/run.py [--quick] [--json PATH]

1. send cost on one no-op async manager: bare send, a pass-through wrapt wrapper (the floor for
   any wrapt adapter) and the guarded send to a CONNECTED thread (target: guarded <= 2x floor);
2. barrier release latency (association -> the waiting send delivered) against a bare
   ``asyncio.Event`` wake (target: p99 <= 10x the bare wake, far below a 10 ms sleep);
3. guarded send cost with 10 and with 100,000 threads known to the guard (target: ratio < 1.2);
4. guarded send cost with one emission listener registered vs none (target: ratio <= 6);
5. OpenTelemetry: (a) a guarded send with no SDK configured vs one with ``tracing=False``
   (target: ratio <= 1.2); (b) with an SDK ``TracerProvider`` (batch processor, discarding
   exporter), a guarded send with its span vs a bare send under a hand-written
   ``start_as_current_span`` (target: ratio <= 1.3);
6. overflow: a buffered send's cost with 50,000 threads buffered, below ``max_total`` vs at it
   (every send evicts the oldest; target: ratio <= 2.0).

Every figure is a ratio of two measurements interleaved in the same process; absolute times are
printed for context only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import wrapt
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

import emitguard

Op = Callable[[], Awaitable[Any]]


class NoopManager:
    """The cheapest possible legacy manager: the send does nothing and reports success."""

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        return True

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        return True


def _passthrough(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


async def _time_loop(
    call: Callable[[str, Any], Awaitable[Any]], threads: list[str], n: int
) -> float:
    """Seconds per call of ``n`` awaited calls cycling over ``threads``."""
    message = {"type": "tool_executing"}
    count = len(threads)
    start = time.perf_counter()
    for i in range(n):
        await call(threads[i % count], message)
    return (time.perf_counter() - start) / n


async def _interleaved(
    variants: dict[str, tuple[Callable[[str, Any], Awaitable[Any]], list[str]]],
    n: int,
    rounds: int,
) -> dict[str, float]:
    """Median seconds per call of each variant, measured in alternating rounds."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for call, threads in variants.values():  # warm up
        await _time_loop(call, threads, n // 10 + 1)
    for _ in range(rounds):
        for name, (call, threads) in variants.items():
            gc.collect()
            samples[name].append(await _time_loop(call, threads, n))
    return {name: statistics.median(values) for name, values in samples.items()}


async def bench_send(n: int, rounds: int) -> dict[str, Any]:
    bare = NoopManager()
    floor = NoopManager()
    floor.send_to_thread = wrapt.FunctionWrapper(floor.send_to_thread, _passthrough)  # type: ignore[method-assign]
    guarded = NoopManager()
    guard = emitguard.guard(guarded)
    guarded.update_connection_thread("user", "t-1")
    assert guard.state("t-1") is emitguard.ConnectionState.CONNECTED
    try:
        times = await _interleaved(
            {
                "bare": (bare.send_to_thread, ["t-1"]),
                "wrapt floor": (floor.send_to_thread, ["t-1"]),
                "guarded": (guarded.send_to_thread, ["t-1"]),
            },
            n,
            rounds,
        )
    finally:
        emitguard.unguard(guarded)
    assert guard.stats().outcomes[emitguard.Outcome.DELIVERED] > 0
    return {
        "seconds_per_send": times,
        "guarded_vs_floor": times["guarded"] / times["wrapt floor"],
        "floor_vs_bare": times["wrapt floor"] / times["bare"],
        "guarded_vs_bare": times["guarded"] / times["bare"],
        "target": "guarded_vs_floor <= 2.0",
    }


async def _event_wake_once() -> float:
    event = asyncio.Event()
    woke = 0.0

    async def waiter() -> None:
        nonlocal woke
        await event.wait()
        woke = time.perf_counter()

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)  # let it start waiting
    start = time.perf_counter()
    event.set()
    await task
    return woke - start


async def _barrier_release_once(manager: NoopManager, thread_id: str) -> float:
    delivered = 0.0
    original = manager.send_to_thread

    async def send(thread: str, message: Any) -> bool:
        nonlocal delivered
        delivered = time.perf_counter()
        return await original(thread, message)

    guard = emitguard.Guard(ready_timeout=5.0)
    task = asyncio.create_task(
        guard.send(thread_id, {"type": "agent_started"}, lambda m: send(thread_id, m))
    )
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the send now waits on the barrier
    start = time.perf_counter()
    guard.mark_connected(thread_id, "user")
    assert await task
    await guard.aclose()
    return delivered - start


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Listener:
    """A listener that does nothing: what any emission hook costs the guard."""

    @emitguard.hookimpl
    def emitguard_emission(self, emission: emitguard.Emission) -> None:
        pass


async def bench_listener(n: int, rounds: int) -> dict[str, Any]:
    """Guarded send with no listener vs with one (every send then makes a record)."""
    manager = NoopManager()
    emitguard.guard(manager)
    manager.update_connection_thread("user", "t-1")
    listener = _Listener()
    quiet: list[float] = []
    heard: list[float] = []
    try:
        await _time_loop(manager.send_to_thread, ["t-1"], n // 10 + 1)
        for _ in range(rounds):
            gc.collect()
            quiet.append(await _time_loop(manager.send_to_thread, ["t-1"], n))
            emitguard.register(listener)
            try:
                gc.collect()
                heard.append(await _time_loop(manager.send_to_thread, ["t-1"], n))
            finally:
                emitguard.unregister(listener)
    finally:
        emitguard.unguard(manager)
    times = {"no listener": statistics.median(quiet), "one listener": statistics.median(heard)}
    return {"seconds_per_send": times, "ratio": times["one listener"] / times["no listener"]}


async def bench_barrier(trials: int) -> dict[str, Any]:
    manager = NoopManager()
    event: list[float] = []
    barrier: list[float] = []
    for i in range(trials):
        event.append(await _event_wake_once())
        barrier.append(await _barrier_release_once(manager, f"t-{i}"))
    result = {
        "event_wake_p50": _percentile(event, 0.5),
        "event_wake_p99": _percentile(event, 0.99),
        "barrier_release_p50": _percentile(barrier, 0.5),
        "barrier_release_p99": _percentile(barrier, 0.99),
    }
    result["p99_ratio"] = result["barrier_release_p99"] / result["event_wake_p99"]
    result["p99_vs_10ms_sleep"] = result["barrier_release_p99"] / 0.010
    result["target"] = "p99_ratio <= 10 and far below the 10 ms sleep"
    return result


async def bench_scale(n: int, rounds: int, many: int) -> dict[str, Any]:
    small_manager, large_manager = NoopManager(), NoopManager()
    small = emitguard.guard(small_manager)
    large = emitguard.guard(large_manager)
    try:
        for i in range(10):
            small.mark_connected(f"t-{i}")
        for i in range(many):
            large.mark_connected(f"t-{i}")
        ten = [f"t-{i}" for i in range(10)]
        spread = [f"t-{i}" for i in range(0, many, max(1, many // 1000))]
        times = await _interleaved(
            {
                "10 threads known": (small_manager.send_to_thread, ten),
                f"{many} threads known": (large_manager.send_to_thread, ten),
                f"{many} threads known, sends spread": (large_manager.send_to_thread, spread),
            },
            n,
            rounds,
        )
    finally:
        emitguard.unguard(small_manager)
        emitguard.unguard(large_manager)
    base = times["10 threads known"]
    return {
        "seconds_per_send": times,
        "ratio": times[f"{many} threads known"] / base,
        "ratio_spread": times[f"{many} threads known, sends spread"] / base,
        "target": "ratio < 1.2",
    }


async def bench_telemetry_off(n: int, rounds: int) -> dict[str, Any]:
    """Guarded send with no OpenTelemetry SDK anywhere vs one with ``tracing=False``."""
    no_sdk, off = NoopManager(), NoopManager()
    no_sdk_guard = emitguard.guard(no_sdk)
    off_guard = emitguard.guard(off, tracing=False)
    try:
        for manager in (no_sdk, off):
            manager.update_connection_thread("u", "t1")
        # both must take the plain hot path, or this measures something else
        assert not no_sdk_guard._tel.active, "an OpenTelemetry SDK is configured globally"
        assert not off_guard._tel.active
        assert no_sdk_guard.state("t1") is emitguard.ConnectionState.CONNECTED
        times = await _interleaved(
            {
                "no SDK": (no_sdk.send_to_thread, ["t1"]),
                "tracing=False": (off.send_to_thread, ["t1"]),
            },
            n,
            rounds,
        )
        assert not no_sdk_guard._tel.active
        assert not off_guard._tel.active
    finally:
        emitguard.unguard(no_sdk)
        emitguard.unguard(off)
    return {
        "seconds_per_send": times,
        "ratio": times["no SDK"] / times["tracing=False"],
        "target": "ratio <= 1.2",
    }


class _DiscardExporter(SpanExporter):
    """Drops every span, counting them by instrumentation scope."""

    def __init__(self) -> None:
        self.exported: dict[str, int] = {}

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        exported = self.exported
        for span in spans:
            scope = span.instrumentation_scope
            name = scope.name if scope is not None else ""
            exported[name] = exported.get(name, 0) + 1
        return SpanExportResult.SUCCESS


SPAN_NAME = "send threads/{thread_id}"
"""The name of the guard's send spans (the destination template, not the thread id)."""


async def bench_telemetry_sdk(n: int, rounds: int) -> dict[str, Any]:
    """With an SDK: the guarded send and its span vs a bare send under a hand-written span."""
    exporter = _DiscardExporter()
    # room for every span of the four span-making variants (warm-up included), so none is
    # dropped for queue overflow however the export thread keeps up
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=4 * (rounds + 1) * n + 1024)
    )
    reader = InMemoryMetricReader()  # never collected during the timed loops
    meters = MeterProvider(metric_readers=[reader])
    tracer = provider.get_tracer("benchmarks")
    bare = NoopManager()

    async def current_span(thread_id: str, message: Any) -> bool:
        with tracer.start_as_current_span(SPAN_NAME, kind=SpanKind.PRODUCER):
            return await bare.send_to_thread(thread_id, message)

    async def plain_span(thread_id: str, message: Any) -> bool:
        span = tracer.start_span(SPAN_NAME, kind=SpanKind.PRODUCER)
        try:
            return await bare.send_to_thread(thread_id, message)
        finally:
            span.end()

    traced, measured = NoopManager(), NoopManager()
    traced_guard = emitguard.guard(traced, tracer_provider=provider)
    measured_guard = emitguard.guard(measured, tracer_provider=provider, meter_provider=meters)
    try:
        for manager in (traced, measured):
            manager.update_connection_thread("u", "t1")
        assert traced_guard._tel.active  # a tracer, no metrics
        assert traced_guard._tel.instruments is None
        assert measured_guard._tel.active  # a tracer and metrics
        assert measured_guard._tel.instruments is not None
        assert traced_guard.state("t1") is emitguard.ConnectionState.CONNECTED
        times = await _interleaved(
            {
                "bare, no span": (bare.send_to_thread, ["t1"]),
                "bare + start_as_current_span": (current_span, ["t1"]),
                "bare + start_span/end": (plain_span, ["t1"]),
                "guarded, tracing": (traced.send_to_thread, ["t1"]),
                "guarded, tracing + metrics": (measured.send_to_thread, ["t1"]),
            },
            n,
            rounds,
        )
    finally:
        emitguard.unguard(traced)
        emitguard.unguard(measured)
        provider.shutdown()  # exports what is still queued
        meters.shutdown()
    delivered = traced_guard.stats().outcomes[emitguard.Outcome.DELIVERED]
    assert delivered > 0
    assert measured_guard.stats().outcomes[emitguard.Outcome.DELIVERED] == delivered
    assert sum(measured_guard._tel.counts.values()) == delivered  # metrics really counted
    # one span per send, none dropped: the guard's two variants and the two hand-written ones
    assert exporter.exported == {"emitguard": 2 * delivered, "benchmarks": 2 * delivered}, (
        exporter.exported
    )
    base = times["bare + start_as_current_span"]
    return {
        "seconds_per_send": times,
        "ratio": times["guarded, tracing"] / base,
        "ratio_vs_start_span": times["guarded, tracing"] / times["bare + start_span/end"],
        "ratio_with_metrics": times["guarded, tracing + metrics"] / base,
        "spans_exported": sum(exporter.exported.values()),
        "target": "ratio <= 1.3",
    }


async def bench_eviction(threads: int, n: int, rounds: int) -> dict[str, Any]:
    """Buffered sends to new threads while ``threads`` threads each hold one buffered event:
    with room to spare vs at ``max_total``, where every send evicts the oldest event."""

    async def never(message: Any) -> bool:  # never called: nothing is associated
        return True

    message = {"type": "tool_executing"}
    below = emitguard.Guard(on_unready="buffer", ttl=None, max_total=10 * threads)
    at_cap = emitguard.Guard(on_unready="buffer", ttl=None, max_total=threads)
    for guard in (below, at_cap):
        for i in range(threads):
            await guard.send(f"full-{i}", message, never)
    counter = iter(range(10**9))

    async def send_below(_thread: str, payload: Any) -> Any:
        return await below.send(f"new-{next(counter)}", payload, never)

    async def send_at_cap(_thread: str, payload: Any) -> Any:
        return await at_cap.send(f"new-{next(counter)}", payload, never)

    times = await _interleaved(
        {"below the cap": (send_below, ["t"]), "at max_total (evicts)": (send_at_cap, ["t"])},
        n,
        rounds,
    )
    stats = at_cap.stats()
    assert stats.pending_total == threads  # bounded: every send evicted one
    assert stats.outcomes[emitguard.Outcome.DROPPED] > 0
    await below.aclose()
    await at_cap.aclose()
    return {
        "threads_buffered": threads,
        "seconds_per_send": times,
        "ratio": times["at max_total (evicts)"] / times["below the cap"],
        "target": "ratio <= 2.0",
    }


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:8.3f} us"


def report(results: dict[str, Any]) -> str:
    send, barrier, scale = results["send"], results["barrier"], results["scale"]
    lines = ["emitguard benchmarks (ratios measured side by side in one run)", ""]
    lines.append("1. send cost, no-op async manager, CONNECTED thread")
    for name, value in send["seconds_per_send"].items():
        lines.append(f"   {name:<14} {_us(value)} per send")
    lines.append(f"   guarded / wrapt floor = {send['guarded_vs_floor']:.2f}x   (target <= 2.0x)")
    lines.append(f"   wrapt floor / bare    = {send['floor_vs_bare']:.2f}x")
    lines.append(f"   guarded / bare        = {send['guarded_vs_bare']:.2f}x")
    lines.append("")
    lines.append("2. barrier release latency (association -> waiting send delivered)")
    lines.append(
        f"   asyncio.Event wake   p50 {_us(barrier['event_wake_p50'])}"
        f"  p99 {_us(barrier['event_wake_p99'])}"
    )
    lines.append(
        f"   barrier release      p50 {_us(barrier['barrier_release_p50'])}"
        f"  p99 {_us(barrier['barrier_release_p99'])}"
    )
    lines.append(f"   p99 barrier / p99 event = {barrier['p99_ratio']:.2f}x   (target <= 10x)")
    lines.append(f"   p99 barrier / 10 ms sleep = {barrier['p99_vs_10ms_sleep']:.4f}")
    lines.append("")
    lines.append("3. guarded send cost vs threads known to the guard")
    for name, value in scale["seconds_per_send"].items():
        lines.append(f"   {name:<36} {_us(value)} per send")
    lines.append(f"   ratio = {scale['ratio']:.2f}   (target < 1.2)")
    lines.append(f"   ratio, sends spread over the known threads = {scale['ratio_spread']:.2f}")
    listener = results["listener"]
    lines.append("")
    lines.append("4. guarded send cost with an emission listener registered (a record per send)")
    for name, value in listener["seconds_per_send"].items():
        lines.append(f"   {name:<14} {_us(value)} per send")
    lines.append(f"   one listener / no listener = {listener['ratio']:.1f}x   (target <= 6x)")
    off, sdk = results["telemetry_off"], results["telemetry_sdk"]
    lines.append("")
    lines.append("5. OpenTelemetry, CONNECTED thread")
    lines.append("   a) no SDK configured (telemetry inactive)")
    for name, value in off["seconds_per_send"].items():
        lines.append(f"   {name:<30} {_us(value)} per send")
    lines.append(f"   no SDK / tracing=False = {off['ratio']:.2f}x   (target <= 1.2x)")
    lines.append("   b) SDK TracerProvider, batch processor, discarding exporter")
    for name, value in sdk["seconds_per_send"].items():
        lines.append(f"   {name:<30} {_us(value)} per send")
    lines.append(
        f"   guarded, tracing / bare + start_as_current_span = {sdk['ratio']:.2f}x"
        "   (target <= 1.3x)"
    )
    lines.append(
        f"   guarded, tracing / bare + start_span/end        = {sdk['ratio_vs_start_span']:.2f}x"
    )
    lines.append(
        f"   guarded, tracing + metrics / bare + start_as_current_span"
        f" = {sdk['ratio_with_metrics']:.2f}x"
    )
    eviction = results["eviction"]
    lines.append("")
    lines.append(
        f"6. overflow: buffered send cost with {eviction['threads_buffered']:,} threads buffered"
    )
    for name, value in eviction["seconds_per_send"].items():
        lines.append(f"   {name:<24} {_us(value)} per send")
    lines.append(f"   at the cap / below it = {eviction['ratio']:.2f}x   (target <= 2.0x)")
    return "\n".join(lines)


def targets_met(results: dict[str, Any]) -> bool:
    return (
        results["send"]["guarded_vs_floor"] <= 2.0
        and results["barrier"]["p99_ratio"] <= 10.0
        and results["scale"]["ratio"] < 1.2
        and results["telemetry_off"]["ratio"] <= 1.2
        and results["telemetry_sdk"]["ratio"] <= 1.3
        and results["listener"]["ratio"] <= 6.0
        and results["eviction"]["ratio"] <= 2.0
    )


async def run(quick: bool) -> dict[str, Any]:
    n, rounds = (20_000, 5) if quick else (100_000, 9)
    return {
        "python": sys.version.split()[0],
        "send": await bench_send(n, rounds),
        "barrier": await bench_barrier(300 if quick else 2000),
        "scale": await bench_scale(n, rounds, 100_000),
        "listener": await bench_listener(n // 4, rounds),
        "telemetry_off": await bench_telemetry_off(n, rounds),
        "telemetry_sdk": await bench_telemetry_sdk(n // 4, rounds),
        "eviction": await bench_eviction(50_000, n // 10, rounds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.quick))
    print(report(results))
    met = targets_met(results)
    print("\nall targets met" if met else "\nSOME TARGETS MISSED")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
