"""Events per second over real loopback sockets: bare legacy manager, guarded, python-socketio.

    python benchmarks/sockets.py [--quick] [--clients N] [--events N] [--rounds N] [--no-confirm]

Three uvicorn servers run side by side in one child process (``_server_process``):

- ``bare``: the report's legacy manager (``LegacyWebSocketManager``) behind a Starlette ``/ws``;
- ``guarded``: the same, with ``emitguard.guard(manager)`` and ``EmitGuardMiddleware``
  (transport confirmation on unless ``--no-confirm``);
- ``socketio``: python-socketio's ``AsyncServer`` (ASGI) emitting the same events to a room,
  read by its own ``AsyncClient`` over the websocket transport.

In each round, N clients connect and join their thread (not timed), then all at once ask for an
agent run of E events and read them all; events/s is N*E over the time from that start to the
last client done. Rounds alternate between the three. Ratios of the medians are the figures:
guarded / bare (target >= 0.9x) and guarded / socketio (reported; we aim to be faster).
The server process's CPU time per event is reported next to them. Absolute rates are for
context only: the clients' process and the servers' share two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
from _server_process import serving
from websockets.asyncio.client import connect

import emitguard
from emitguard_adapters.starlette import EmitGuardMiddleware
from emitguard_adapters.testing import LegacyWebSocketManager, legacy_app

Client = Callable[[str, str, int, "_Start"], Awaitable[int]]


async def _legacy_client(address: str, thread_id: str, events: int, start: _Start) -> int:
    async with connect(f"ws://{address}/ws", max_queue=None) as ws:
        # The hello starts an empty run (whose one event may race the association, lost on
        # the bare manager) and associates the thread; the timed run comes after.
        await ws.send(json.dumps({"user_id": thread_id, "thread_id": thread_id, "events": 0}))
        await asyncio.sleep(0.05)
        await start.wait()
        await ws.send(json.dumps({"events": events}))
        got = 0
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["type"] == "agent_update":
                got += 1
            elif message["type"] == "agent_completed" and got:
                return got


def socketio_app(events_default: int = 0) -> Any:
    """python-socketio's server: ``join`` a thread's room, ``start`` a run emitting to it."""
    sio = socketio.AsyncServer(async_mode="asgi")

    @sio.event  # type: ignore[untyped-decorator]
    async def join(sid: str, data: dict[str, Any]) -> bool:
        await sio.enter_room(sid, data["thread_id"])
        return True

    @sio.event  # type: ignore[untyped-decorator]
    async def start(sid: str, data: dict[str, Any]) -> None:
        room = data["thread_id"]
        for n in range(int(data.get("events", events_default))):
            await sio.emit("agent_update", {"type": "agent_update", "n": n}, to=room)
        await sio.emit("agent_completed", {"type": "agent_completed"}, to=room)

    return socketio.ASGIApp(sio)


async def _socketio_client(address: str, thread_id: str, events: int, start: _Start) -> int:
    client = socketio.AsyncClient()
    done = asyncio.Event()
    got = 0

    async def on_update(data: Any) -> None:
        nonlocal got
        got += 1

    async def on_completed(data: Any) -> None:
        done.set()

    client.on("agent_update", on_update)
    client.on("agent_completed", on_completed)
    await client.connect(f"http://{address}", transports=["websocket"])
    try:
        await client.call("join", {"thread_id": thread_id})
        await start.wait()
        await client.emit("start", {"thread_id": thread_id, "events": events})
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await client.disconnect()
    return got


class _Start:
    """Lets every client connect and join first, then starts them all at once."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_in = asyncio.Event()
        self.go = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_in.set()
        await self.go.wait()


async def _round(address: str, client: Client, clients: int, events: int) -> float:
    start = _Start(clients)
    tasks = [asyncio.create_task(client(address, f"t{i}", events, start)) for i in range(clients)]
    await asyncio.wait_for(start.all_in.wait(), 30)
    begin = time.perf_counter()
    start.go.set()
    counts = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - begin
    assert all(count == events for count in counts), counts
    return clients * events / elapsed


_MANAGERS: dict[str, LegacyWebSocketManager] = {}


def apps(confirm: str = "1") -> dict[str, Any]:
    """The three servers (built in the server process by ``_server_process``)."""
    bare_manager = _MANAGERS["bare"] = LegacyWebSocketManager()
    guarded_manager = _MANAGERS["guarded"] = LegacyWebSocketManager()
    guard = emitguard.guard(guarded_manager)
    return {
        "bare": legacy_app(bare_manager, lag=0.0),
        "guarded": EmitGuardMiddleware(
            legacy_app(guarded_manager, lag=0.0), guard=guard, confirm_delivery=confirm == "1"
        ),
        "socketio": socketio_app(),
    }


def report() -> dict[str, Any]:
    """What the server process tells the benchmark when it stops."""
    return {"lost_guarded": _MANAGERS["guarded"].lost}


async def run(clients: int, events: int, rounds: int, confirm: bool = True) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"bare": [], "guarded": [], "socketio": []}
    cpu: dict[str, list[float]] = {"bare": [], "guarded": [], "socketio": []}
    clients_of: dict[str, Client] = {
        "bare": _legacy_client,
        "guarded": _legacy_client,
        "socketio": _socketio_client,
    }
    with serving("sockets", "apps", "1" if confirm else "0") as server:
        for name, client in clients_of.items():  # warm up
            await _round(server.addresses[name], client, clients, events // 10 + 1)
        for _ in range(rounds):
            for name, client in clients_of.items():
                before = server.cpu()
                rates[name].append(await _round(server.addresses[name], client, clients, events))
                cpu[name].append((server.cpu() - before) / (clients * events) * 1e6)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "clients": clients,
        "events_per_client": events,
        "rounds": rounds,
        "confirm": confirm,
        "events_per_s": medians,
        "server_cpu_us_per_event": cpu_medians,
        "guarded_vs_bare": medians["guarded"] / medians["bare"],
        "guarded_vs_socketio": medians["guarded"] / medians["socketio"],
        "server_cpu_guarded_vs_bare": cpu_medians["guarded"] / cpu_medians["bare"],
        "guarded_vs_bare_per_round": [
            g / b for g, b in zip(rates["guarded"], rates["bare"], strict=True)
        ],
        "lost_guarded": server.report["lost_guarded"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and rounds")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--no-confirm", action="store_true", help="middleware without transport confirmation"
    )
    args = parser.parse_args(argv)
    events, rounds = (100, 3) if args.quick else (args.events, args.rounds)
    result = asyncio.run(run(args.clients, events, rounds, not args.no_confirm))
    rates = result["events_per_s"]
    print(f"{args.clients} clients x {events} events, {rounds} rounds, loopback")
    confirmed = "off" if args.no_confirm else "on"
    print(f"   transport confirmation {confirmed}; guarded run lost {result['lost_guarded']}")
    print(f"   bare legacy manager    {rates['bare']:10.0f} events/s")
    print(f"   guarded + middleware   {rates['guarded']:10.0f} events/s")
    print(f"   python-socketio        {rates['socketio']:10.0f} events/s")
    spread = ", ".join(f"{r:.2f}" for r in result["guarded_vs_bare_per_round"])
    print(f"   guarded / bare     = {result['guarded_vs_bare']:.2f}x   (target >= 0.9x; {spread})")
    print(f"   guarded / socketio = {result['guarded_vs_socketio']:.2f}x   (reported)")
    cpu = result["server_cpu_us_per_event"]
    print(
        f"   server CPU per event: bare {cpu['bare']:.1f} us, guarded {cpu['guarded']:.1f} us,"
        f" socketio {cpu['socketio']:.1f} us; guarded / bare ="
        f" {result['server_cpu_guarded_vs_bare']:.2f}x"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 0 if result["guarded_vs_bare"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
