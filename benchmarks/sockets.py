"""Events per second over real loopback sockets: the bare legacy manager vs. guarded.

    python benchmarks/sockets.py [--quick] [--clients N] [--events N] [--rounds N]

Two uvicorn servers run side by side in this process, one with the bare
``LegacyWebSocketManager`` and one guarded (``emitguard.guard`` plus ``EmitGuardMiddleware``,
transport confirmation on). In alternating rounds, N ``websockets`` clients each ask for an agent
run of E events and read them all; events/s is total events over the round's wall time. The
figure is the ratio of the medians (target: guarded >= 0.9x bare). Absolute rates are printed
for context only: client and servers share one process and two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from websockets.asyncio.client import connect

import emitguard
from emitguard_adapters.starlette import EmitGuardMiddleware
from emitguard_adapters.testing import LegacyWebSocketManager, legacy_app, serve


async def _client(address: str, thread_id: str, events: int) -> int:
    async with connect(f"ws://{address}/ws") as ws:
        await ws.send(json.dumps({"user_id": thread_id, "thread_id": thread_id, "events": 0}))
        await asyncio.sleep(0.05)  # the association (lag) is done: measure delivery, not the race
        started = False
        await ws.send(json.dumps({"events": events}))
        got = 0
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["type"] == "agent_update":
                started = True
                got += 1
            elif message["type"] == "agent_completed" and started:
                return got


async def _round(address: str, clients: int, events: int) -> float:
    begin = time.perf_counter()
    counts = await asyncio.gather(*(_client(address, f"t{i}", events) for i in range(clients)))
    elapsed = time.perf_counter() - begin
    assert all(count == events for count in counts), counts
    return clients * events / elapsed


async def run(clients: int, events: int, rounds: int, confirm: bool = True) -> dict[str, Any]:
    bare_manager = LegacyWebSocketManager()
    guarded_manager = LegacyWebSocketManager()
    guard = emitguard.guard(guarded_manager)
    bare_app = legacy_app(bare_manager, lag=0.0)
    guarded_app = EmitGuardMiddleware(
        legacy_app(guarded_manager, lag=0.0), guard=guard, confirm_delivery=confirm
    )
    rates: dict[str, list[float]] = {"bare": [], "guarded": []}
    async with serve(bare_app) as bare, serve(guarded_app) as guarded:
        await _round(bare, clients, events // 10 + 1)  # warm up
        await _round(guarded, clients, events // 10 + 1)
        for _ in range(rounds):
            rates["bare"].append(await _round(bare, clients, events))
            rates["guarded"].append(await _round(guarded, clients, events))
    emitguard.unguard(guarded_manager)
    bare_rate = statistics.median(rates["bare"])
    guarded_rate = statistics.median(rates["guarded"])
    return {
        "clients": clients,
        "events_per_client": events,
        "rounds": rounds,
        "bare_events_per_s": bare_rate,
        "guarded_events_per_s": guarded_rate,
        "ratio": guarded_rate / bare_rate,
        "ratios_per_round": [g / b for g, b in zip(rates["guarded"], rates["bare"], strict=True)],
        "lost_guarded": guarded_manager.lost,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and rounds")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--no-confirm", action="store_true", help="middleware without transport confirmation"
    )
    args = parser.parse_args(argv)
    events, rounds = (100, 3) if args.quick else (args.events, args.rounds)
    result = asyncio.run(run(args.clients, events, rounds, not args.no_confirm))
    confirmed = "off" if args.no_confirm else "on"
    print(f"{args.clients} clients x {events} events, {rounds} rounds, loopback")
    print(f"   transport confirmation {confirmed}; guarded run lost {result['lost_guarded']}")
    print(f"   bare legacy manager   {result['bare_events_per_s']:10.0f} events/s")
    print(f"   guarded + middleware  {result['guarded_events_per_s']:10.0f} events/s")
    spread = ", ".join(f"{r:.2f}" for r in result["ratios_per_round"])
    print(f"   guarded / bare = {result['ratio']:.2f}x   (target >= 0.9x; rounds: {spread})")
    return 0 if result["ratio"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
