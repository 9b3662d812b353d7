"""emitguard memory benchmark: what a guard keeps of threads that came and went.

    python benchmarks/memory.py [--threads N] [--events K] [--json PATH]

A guarded manager serves ``N`` threads (default 100,000) one after the other: each is
associated by its own owner, receives ``K`` events (default 3, about 200 bytes each) and its
owner leaves for good (``disconnect``). The guard stays alive; what it still holds is
measured, with and without a replay window (``history=100``):

- retained bytes per departed thread: ``tracemalloc`` (live Python allocations, after
  ``gc.collect()``), from a baseline taken after the first thread to the end;
- marginal bytes per thread over the second half of the run (does the total still grow
  with the number of threads ever seen?);
- resident set size growth (a second figure, from a run without ``tracemalloc``; the
  allocator does not give all memory back, so this is an upper bound).

Targets (issue 10): under 100 bytes per departed thread without history; with history a
bounded total, read here as a marginal cost under 100 bytes per extra thread. They are
reported, never enforced. Each measurement runs in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import emitguard

TARGET_BYTES = 100
CONFIGS: dict[str, int] = {"no history": 0, "history=100": 100}
PAYLOAD = "x" * 160


class Manager:
    """A manager that keeps nothing itself: whatever is retained is the guard's."""

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        return True

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        return True

    def disconnect_user(self, user_id: str) -> None:
        return None


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def current_bytes(traced: bool) -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] if traced else rss_bytes()


async def measure(threads: int, events: int, history: int, traced: bool) -> dict[str, Any]:
    """One run in this interpreter: ``traced`` measures with tracemalloc, else RSS."""
    if traced:
        tracemalloc.start()
    manager = Manager()
    guard = emitguard.guard(manager, disconnect="disconnect_user", history=history)

    async def serve(index: int) -> None:
        thread, owner = f"thread-{index}", f"user-{index}"
        manager.update_connection_thread(owner, thread)
        for n in range(events):
            await manager.send_to_thread(thread, {"type": "token", "n": n, "text": PAYLOAD})
        manager.disconnect_user(owner)

    await serve(0)
    baseline = current_bytes(traced)
    half = threads // 2
    started = time.perf_counter()
    for index in range(1, threads):
        await serve(index)
        if index == half:
            at_half = current_bytes(traced)
    seconds = time.perf_counter() - started
    end = current_bytes(traced)
    stats = guard.stats()
    assert stats.pending_total == 0, stats.pending_total
    emitguard.unguard(manager)
    departed = threads - 1
    return {
        "retained": end - baseline,
        "per_thread": (end - baseline) / departed,
        "marginal_per_thread": (end - at_half) / (threads - 1 - half),
        "threads_known": sum(1 for _ in guard.threads()),
        "seconds": seconds,
    }


def child(args: argparse.Namespace) -> None:
    result = asyncio.run(measure(args.threads, args.events, args.history, args.traced))
    print(json.dumps(result))


def run_child(threads: int, events: int, history: int, traced: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", "--threads", str(threads)]
    command += ["--events", str(events), "--history", str(history)]
    command += ["--traced"] if traced else []
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=100_000, help="threads that come and go")
    parser.add_argument("--events", type=int, default=3, help="events each thread receives")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--history", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 4:
        parser.error(f"--threads must be >= 4, got {args.threads}")
    if args.child:
        child(args)
        return 0

    print(f"memory kept for {args.threads:,} threads that each got {args.events} events and left")
    print(
        f"{'config':<13} {'B/thread':>9} {'marginal B/thread':>18} {'total':>10} "
        f"{'RSS growth':>11} {'RSS B/thread':>13} {'threads kept':>13}  target"
    )
    figures: dict[str, Any] = {}
    for name, history in CONFIGS.items():
        traced = run_child(args.threads, args.events, history, traced=True)
        rss = run_child(args.threads, args.events, history, traced=False)
        if history:
            met = traced["marginal_per_thread"] < TARGET_BYTES
            target = f"bounded total (marginal < {TARGET_BYTES} B/thread): "
        else:
            met = traced["per_thread"] < TARGET_BYTES
            target = f"< {TARGET_BYTES} B/thread: "
        target += "met" if met else "NOT met"
        figures[name] = {"tracemalloc": traced, "rss": rss, "target": target, "met": met}
        print(
            f"{name:<13} {traced['per_thread']:>9.0f} {traced['marginal_per_thread']:>18.0f} "
            f"{traced['retained'] / 1e6:>8.1f}MB {rss['retained'] / 1e6:>9.1f}MB "
            f"{rss['per_thread']:>13.0f} {traced['threads_known']:>13,}  {target}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"threads": args.threads, "events": args.events, **figures}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
