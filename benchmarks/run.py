"""emitguard benchmarks: ratios measured side by side in one run.

    python benchmarks/run.py [--quick] [--json PATH]

1. send cost on one no-op async manager: bare send, a pass-through wrapt wrapper (the floor for
   any wrapt adapter) and the guarded send to a CONNECTED thread (target: guarded <= 2x floor);
2. barrier release latency (association -> the waiting send delivered) against a bare
   ``asyncio.Event`` wake (target: p99 <= 10x the bare wake, far below a 10 ms sleep);
3. guarded send cost with 10 and with 100,000 threads known to the guard (target: ratio < 1.2).

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
from collections.abc import Awaitable, Callable
from typing import Any

import wrapt

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
    lines.append("4. guarded send cost with an emission listener registered (no target)")
    for name, value in listener["seconds_per_send"].items():
        lines.append(f"   {name:<14} {_us(value)} per send")
    lines.append(f"   one listener / no listener = {listener['ratio']:.1f}x")
    return "\n".join(lines)


def targets_met(results: dict[str, Any]) -> bool:
    return (
        results["send"]["guarded_vs_floor"] <= 2.0
        and results["barrier"]["p99_ratio"] <= 10.0
        and results["scale"]["ratio"] < 1.2
    )


async def run(quick: bool) -> dict[str, Any]:
    n, rounds = (20_000, 5) if quick else (100_000, 9)
    return {
        "python": sys.version.split()[0],
        "send": await bench_send(n, rounds),
        "barrier": await bench_barrier(300 if quick else 2000),
        "scale": await bench_scale(n, rounds, 100_000),
        "listener": await bench_listener(n // 4, rounds),
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
