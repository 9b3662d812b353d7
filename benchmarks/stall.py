"""Stalled readers over real loopback sockets: does anyone else notice?

    python benchmarks/stall.py [--clients 50] [--stalled 5] [--events 2000] [--size 10000]
                               [--send-timeout 0.5] [--rounds 3] [--json PATH]

A ThreadHub behind uvicorn, the endpoint of docs/starlette.md, ``websockets`` clients on one
thread, ``--stalled`` of which never read. The agent emits ``--events`` events of ``--size``
bytes, 1 ms apart. Reported per round: the agent's ``hub.send`` time (p50, p99, max), how long
each stalled reader's write had been under way when it was closed (the ``send_timeout``
deadline, or sooner when its queue overflowed), and the readers' delivery latency (p50, p99).
Then the latency of an unrelated HTTP request while three sync ``authorize`` calls of 1 s run.
Clients and server share one process and event loop: absolute figures are for context.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import statistics
import sys
import time
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect

from emitguard_adapters.starlette import EmitGuardMiddleware, ThreadHub, allow_any
from emitguard_adapters.testing import serve


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


class Stalls(logging.Handler):
    """Collects how long the write under way had taken when the hub stopped a reader."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.waited: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        waited = getattr(record, "emitguard_waited", None)
        if waited is not None:
            self.waited.append(waited)


def app_of(hub: ThreadHub) -> Any:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await hub.serve(websocket)

    async def ping(request: Any) -> PlainTextResponse:
        return PlainTextResponse("pong")

    routes = [WebSocketRoute("/ws", endpoint), Route("/ping", ping)]
    return EmitGuardMiddleware(Starlette(routes=routes), guard=hub.guard)


async def hello(address: str, last_seq: int | None = None) -> ClientConnection:
    ws = await connect(f"ws://{address}/ws", ping_interval=None, compression=None)
    await ws.send(json.dumps({"thread_id": "t1", "last_seq": last_seq}))
    return ws


async def read(ws: ClientConnection, events: int) -> list[float]:
    latencies: list[float] = []
    seq = 0
    while seq < events:
        message = json.loads(await asyncio.wait_for(ws.recv(), 60))
        latencies.append(time.perf_counter() - message["at"])
        assert message["seq"] == seq + 1, (message["seq"], seq)
        seq = message["seq"]
    return latencies


async def stall_round(args: argparse.Namespace) -> dict[str, Any]:
    hub = ThreadHub(
        authorize=allow_any,
        history=args.events,
        queue_size=args.queue_size,
        send_timeout=args.send_timeout,
    )
    stalls = Stalls()
    logger = logging.getLogger("emitguard")
    logger.addHandler(stalls)
    logger.setLevel(logging.INFO)
    try:
        async with serve(app_of(hub)) as address:
            readers = [await hello(address) for _ in range(args.clients - args.stalled)]
            stalled = [await hello(address) for _ in range(args.stalled)]
            for _ in range(1000):  # until the server attached them all
                if hub.connections("t1") == args.clients:
                    break
                await asyncio.sleep(0.01)
            reading = [asyncio.create_task(read(ws, args.events)) for ws in readers]
            took: list[float] = []
            pad = "x" * args.size
            for n in range(args.events):
                message = {"type": "agent_update", "n": n, "at": time.perf_counter(), "pad": pad}
                started = time.perf_counter()
                await hub.send("t1", message)
                took.append(time.perf_counter() - started)
                await asyncio.sleep(0.001)
            latencies = [x for one in await asyncio.gather(*reading) for x in one]
            for ws in stalled:  # drain them, so that the server can stop
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), 30)
                except Exception:
                    pass
            for ws in readers:
                await ws.close()
    finally:
        logger.removeHandler(stalls)
    return {
        "send_p50_ms": statistics.median(took) * 1000,
        "send_p99_ms": percentile(took, 99) * 1000,
        "send_max_ms": max(took) * 1000,
        "stalled_closed_after_s": sorted(stalls.waited),
        "delivery_p50_ms": statistics.median(latencies) * 1000,
        "delivery_p99_ms": percentile(latencies, 99) * 1000,
    }


async def authorize_round() -> float:
    """The worst latency of 20 unrelated requests while three 1 s sync authorisations run."""

    def slow(websocket: Any, thread_id: str) -> bool:
        time.sleep(1.0)
        return True

    hub = ThreadHub(authorize=slow)
    async with serve(app_of(hub)) as address, httpx.AsyncClient() as http:
        await http.get(f"http://{address}/ping")
        sockets = [await hello(address) for _ in range(3)]
        await asyncio.sleep(0.05)
        worst = 0.0
        for _ in range(20):
            started = time.perf_counter()
            await http.get(f"http://{address}/ping")
            worst = max(worst, time.perf_counter() - started)
        for ws in sockets:
            await ws.close()
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--stalled", type=int, default=5)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--queue-size", type=int, default=500)
    parser.add_argument("--send-timeout", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    rounds = [asyncio.run(stall_round(args)) for _ in range(args.rounds)]
    worst_unrelated = asyncio.run(authorize_round())
    print(
        f"{args.clients} clients on one thread, {args.stalled} never read; {args.events} events "
        f"of {args.size} B, 1 ms apart; queue_size {args.queue_size}, "
        f"send_timeout {args.send_timeout} s"
    )
    for number, one in enumerate(rounds, 1):
        closed = ", ".join(f"{x:.2f}" for x in one["stalled_closed_after_s"])
        print(
            f"   round {number}: hub.send p50 {one['send_p50_ms']:.2f} ms, "
            f"p99 {one['send_p99_ms']:.2f} ms, max {one['send_max_ms']:.2f} ms; "
            f"stalled closed after {closed} s; delivery p50 {one['delivery_p50_ms']:.1f} ms, "
            f"p99 {one['delivery_p99_ms']:.1f} ms"
        )
    print(f"   unrelated request during three 1 s sync authorisations: worst "
          f"{worst_unrelated * 1000:.1f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"rounds": rounds, "unrelated_worst_s": worst_unrelated}, out, indent=2)
    ok = all(one["send_p99_ms"] < 10 for one in rounds) and worst_unrelated < 0.05
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
