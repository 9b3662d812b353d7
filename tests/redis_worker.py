"""A tiny app worker for the multi-process Redis tests: one guard on a shared Redis, a stand-in
socket per thread connected here, commands as JSON lines on stdin, answers on stdout.

    {"op": "connect", "threads": [...]}   these threads' sockets live in this worker
    {"op": "emit", "items": [[thread, n], ...]}  send them (per thread in order, threads at once)
    {"op": "stream", "thread": t, "count": k}    send n = 0, 1, ... printing "ack n" after each
    {"op": "report"}                       -> {"received": {thread: [[seq, n], ...]}, "stats": ...}

Run: ``python tests/redis_worker.py <redis url>``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from emitguard import Guard

received: dict[str, list[list[int]]] = {}


async def deliver(thread_id: str, message: Any) -> None:
    received.setdefault(thread_id, []).append([message["seq"], message["n"]])


def say(answer: Any) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


async def main(url: str) -> None:
    guard = Guard(outbox=url, deliver=deliver, stamp_seq="seq", name="worker")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[Any]] = set()

    async def emit_in_order(thread_id: str, numbers: list[int]) -> None:
        for n in numbers:
            await guard.send(thread_id, {"type": "event", "n": n}, deliver=_not_here)

    async def stream(thread_id: str, count: int) -> None:
        for n in range(count):
            if await guard.send(thread_id, {"type": "event", "n": n}, deliver=_not_here):
                say(f"ack {n}")

    say("ready")
    while line := await reader.readline():
        command = json.loads(line)
        op = command["op"]
        if op == "connect":
            for thread_id in command["threads"]:
                guard.mark_connected(thread_id)
            say("ok")
        elif op == "emit":
            per_thread: dict[str, list[int]] = {}
            for thread_id, n in command["items"]:
                per_thread.setdefault(thread_id, []).append(n)
            await asyncio.gather(*(emit_in_order(t, ns) for t, ns in per_thread.items()))
            say("ok")
        elif op == "stream":
            task = loop.create_task(stream(command["thread"], command["count"]))
            tasks.add(task)
        elif op == "report":
            stats = guard.stats()
            say({"received": received, "backend": dict(stats.backend)})
        elif op == "quit":
            break
    await guard.aclose()


async def _not_here(message: Any) -> None:
    raise AssertionError("delivered with the worker's deliver=, never the caller's send")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
