"""emitguard Redis outbox benchmark: a guarded send through Redis against raw redis-py.

    python benchmarks/redis_outbox.py [--events N] [--url redis://...] [--json PATH]

Starts its own ``redis-server`` on a free port (no persistence, so the figures are those of
the client path) unless ``--url`` names one. In one run, each figure the median of 3 rounds:

- raw: redis-py's asyncio client calling the very same Lua script (``EVALSHA``: seq, ``XADD
  MAXLEN``, expiry, dedupe key, ``PUBLISH``) with the same arguments (JSON, a fresh emission
  id), one after the other: the Redis work a guarded send does, without the guard;
- redis: ``await guard.send(...)`` on a guard with ``outbox="redis://..."`` (target: at least
  0.7x raw's events/s), and the added latency per emit (p50, p99) over raw;
- memory: the same send on a memory-outbox guard to a connected thread (reported);
- cross-worker delivery: a send on one guard reaching ``deliver`` on another guard with its
  own connections and worker id (loopback, one process, so one clock): p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from typing import Any

from emitguard import Guard
from emitguard.redis_outbox import APPEND

TARGET = 0.7


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def raw(url: str, events: int) -> list[float]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, decode_responses=True)
    script = client.register_script(APPEND)
    took = []
    thread = f"raw-{uuid.uuid4().hex[:6]}"
    keys = [f"emitguard:{{{thread}}}:stream", f"emitguard:{{{thread}}}:meta"]
    for n in range(events):
        started = time.perf_counter()
        message = {"type": "token", "n": n}
        await script(
            keys=[*keys, f"emitguard:{{{thread}}}:e:{uuid.uuid4().hex}"],
            args=[
                json.dumps(message, separators=(",", ":")),
                message["type"],
                repr(time.time()),
                "abcdef012345",
                1000,
                86_400_000,
                f"emitguard:{{{thread}}}:notices",
                600_000,
            ],
        )
        took.append(time.perf_counter() - started)
    await client.aclose()
    return took


async def guarded(outbox: str | None, events: int) -> list[float]:
    async def socket_send(message: Any) -> None:
        return None

    guard = Guard(outbox=outbox) if outbox else Guard()
    thread = f"g-{uuid.uuid4().hex[:6]}"
    if outbox is None:
        guard.mark_connected(thread)
    took = []
    for n in range(events):
        started = time.perf_counter()
        await guard.send(thread, {"type": "token", "n": n}, socket_send)
        took.append(time.perf_counter() - started)
    await guard.aclose()
    return took


async def cross_worker(url: str, events: int) -> list[float]:
    latencies: list[float] = []
    done = asyncio.Event()

    async def deliver(thread_id: str, message: Any) -> None:
        latencies.append(time.perf_counter() - message["t0"])
        if len(latencies) == events:
            done.set()

    receiver = Guard(outbox=url, deliver=deliver)
    sender = Guard(outbox=url)
    thread = f"x-{uuid.uuid4().hex[:6]}"
    receiver.mark_connected(thread)
    while not await sender.wait_ready(thread, 1.0):
        pass
    await asyncio.sleep(0.2)  # the receiver's notice subscription is in place
    for _ in range(events):
        await sender.send(thread, {"t0": time.perf_counter()}, _unused)
        await asyncio.sleep(0.001)  # a stream of tokens, not one burst
    await asyncio.wait_for(done.wait(), 30)
    await sender.aclose()
    await receiver.aclose()
    return latencies


async def _unused(message: Any) -> None:
    raise AssertionError("not used with a shared outbox")


async def measure(url: str, events: int) -> dict[str, Any]:
    rounds: dict[str, list[list[float]]] = {"raw": [], "redis": [], "memory": []}
    for _ in range(3):
        rounds["raw"].append(await raw(url, events))
        rounds["redis"].append(await guarded(url, events))
        rounds["memory"].append(await guarded(None, events))

    def rate(name: str) -> float:
        return statistics.median(len(r) / sum(r) for r in rounds[name])

    def median_pct(name: str, q: float) -> float:
        return statistics.median(pct(r, q) for r in rounds[name])

    added = {
        q: (median_pct("redis", v) - median_pct("raw", v)) * 1e6
        for q, v in (("p50", 0.5), ("p99", 0.99))
    }
    crossing = await cross_worker(url, min(events, 2000))
    result = {
        "events": events,
        "raw_per_s": round(rate("raw")),
        "redis_per_s": round(rate("redis")),
        "memory_per_s": round(rate("memory")),
        "redis_vs_raw": round(rate("redis") / rate("raw"), 3),
        "redis_emit_p50_us": round(median_pct("redis", 0.5) * 1e6, 1),
        "redis_emit_p99_us": round(median_pct("redis", 0.99) * 1e6, 1),
        "added_p50_us": round(added["p50"], 1),
        "added_p99_us": round(added["p99"], 1),
        "cross_worker_p50_ms": round(pct(crossing, 0.5) * 1e3, 3),
        "cross_worker_p99_ms": round(pct(crossing, 0.99) * 1e3, 3),
    }
    result["target_met"] = result["redis_vs_raw"] >= TARGET
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--url", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    server = None
    url = args.url
    with tempfile.TemporaryDirectory() as directory:
        if url is None:
            port = free_port()
            binary = shutil.which("redis-server") or "redis-server"
            server = subprocess.Popen(
                [binary, "--port", str(port), "--save", "", "--appendonly", "no",
                 "--dir", directory],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            url = f"redis://127.0.0.1:{port}/0"
            time.sleep(0.3)
        try:
            result = asyncio.run(measure(url, args.events))
        finally:
            if server is not None:
                server.kill()
                server.wait()
    for name, value in result.items():
        print(f"{name:>22}: {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
