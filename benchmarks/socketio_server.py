"""python-socketio guarded vs bare over real sockets, and recovery of missed events.

    python benchmarks/socketio_server.py [--quick] [--clients N] [--events N] [--rounds N]
                                  [--missed N]

Throughput: three uvicorn servers run the same python-socketio ``AsyncServer`` app side by
side, in one child process (``_server_process``): bare, guarded with ``guard_server(sio)``
(barrier, outbox, transport confirmation), and guarded with ``recovery=True`` (also a seq
stamped on every emit, the replay window, and clients that dedupe with ``recovering``). In
each round N ``AsyncClient``s (websocket transport) join their room, then all at once ask for
a run of E events emitted to their room and read them all; events/s is N*E over the time from
that start to the last client done. Rounds rotate the order of the servers; the figures are
the ratio of the medians, guarded / bare (target >= 0.9x), and the median of each round's
ratio, with how many rounds met it, and the CPU time per event of the server process and of
the clients. The server process runs on a CPU of its own and the clients on the others
(``ServerProcess.pin``), so neither takes the other's core; unpinned, three runs on a
quiet machine gave 0.76x, 0.80x and 1.23x.

Recovery: a client's transport is killed and it is away while M events (default 1,000) are
emitted to its room (another member stays, so they are delivered and land in the replay
window); on its return (Socket.IO's recovery: pid and offset in its CONNECT auth) it gets them
replayed from the window, then a live event. Reported: the time from the reconnect to the
first live event, and that all M + 1 arrived in order.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, and this file's name would
# shadow the python-socketio package: take the folder off before importing it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import socketio  # noqa: E402

sys.path.append(str(_HERE))  # after site-packages: for _server_process
from _server_process import serving  # noqa: E402

from emitguard_adapters.socketio import guard_server, recovering  # noqa: E402
from emitguard_adapters.testing import serve  # noqa: E402


def app(events: dict[str, int]) -> socketio.AsyncServer:
    sio = socketio.AsyncServer(async_mode="asgi")

    @sio.event
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)

    @sio.event
    async def start(sid: str, room: str) -> None:
        text = "x" * events.get("payload", 0)
        for n in range(events["n"]):
            await sio.emit("tick", {"n": n, "text": text}, to=room)

    return sio


async def one_client(
    url: str, room: str, events: int, go: asyncio.Event, recovery: bool
) -> None:
    client = socketio.AsyncClient()
    if recovery:
        state = recovering(client)
        auth: Any = state.auth
    else:
        auth = None
    done = asyncio.Event()
    got = 0

    @client.on("tick")
    async def tick(data: dict[str, Any]) -> None:
        nonlocal got
        got += 1
        if got == events:
            done.set()

    await client.connect(url, transports=["websocket"], auth=auth)
    await client.call("join", room)
    await go.wait()
    await client.emit("start", room)
    await asyncio.wait_for(done.wait(), 60)
    await client.disconnect()


async def round_rate(url: str, clients: int, events: int, recovery: bool) -> float:
    go = asyncio.Event()
    tasks = [
        asyncio.create_task(one_client(url, f"room-{i}", events, go, recovery))
        for i in range(clients)
    ]
    await asyncio.sleep(0.3)  # connected and joined (not timed)
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return clients * events / (time.perf_counter() - started)


SERVERS = ("bare", "guarded", "recovery")


def apps(events: str, payload: str = "0") -> dict[str, Any]:
    """The three servers (built in the server process by ``_server_process``): bare,
    guarded with the defaults (transport confirmation), guarded with ``recovery=True``."""
    settings = {"n": int(events), "payload": int(payload)}
    built = {name: app(settings) for name in SERVERS}
    guard_server(built["guarded"])
    guard_server(built["recovery"], recovery=True, history=int(events))
    return {name: socketio.ASGIApp(sio) for name, sio in built.items()}


async def throughput(clients: int, events: int, rounds: int, payload: int = 0) -> None:
    rates: dict[str, list[float]] = {name: [] for name in SERVERS}
    cpu: dict[str, list[float]] = {name: [] for name in SERVERS}
    client_cpu: dict[str, list[float]] = {name: [] for name in SERVERS}
    with serving("socketio_server", "apps", str(events), str(payload)) as server:
        pinned = server.pin()
        for number in range(rounds):
            shift = number % len(SERVERS)  # each server takes each place in the order
            for name in SERVERS[shift:] + SERVERS[:shift]:
                url = f"http://{server.addresses[name]}"
                before, here = server.cpu(), time.process_time()
                rates[name].append(await round_rate(url, clients, events, name == "recovery"))
                cpu[name].append((server.cpu() - before) / (clients * events) * 1e6)
                client_cpu[name].append((time.process_time() - here) / (clients * events) * 1e6)
    print(
        f"throughput, {clients} clients x {events} events of {payload} extra bytes, "
        f"{rounds} rounds; {pinned}"
    )
    for name in SERVERS:
        print(
            f"  {name:9}median {statistics.median(rates[name]):9.0f} events/s  "
            f"{_spread(rates[name])}; CPU us/event: server {statistics.median(cpu[name]):.1f}, "
            f"clients {statistics.median(client_cpu[name]):.1f}"
        )
    bare_rate, bare_cpu = statistics.median(rates["bare"]), statistics.median(cpu["bare"])
    for name in SERVERS[1:]:
        paired = [g / b for g, b in zip(rates[name], rates["bare"], strict=True)]
        met = sum(ratio >= 0.9 for ratio in paired)
        print(
            f"  {name} / bare = {statistics.median(rates[name]) / bare_rate:.2f}x, "
            f"round by round median {statistics.median(paired):.2f}x "
            f"(target >= 0.9x; met in {met} of {rounds} rounds); server CPU "
            f"{statistics.median(cpu[name]) / bare_cpu:.2f}x"
        )
    print("  (server CPU per event includes the round's connects)")


async def recovery(missed: int) -> None:
    sio = app({"n": 0, "payload": 0})
    adapter = guard_server(sio, recovery=True, history=missed + 10, max_disconnection_duration=30)
    received: list[int] = []
    live = asyncio.Event()
    try:
        async with serve(socketio.ASGIApp(sio)) as address:
            client = socketio.AsyncClient(reconnection=False)
            state = recovering(client)

            @client.on("tick")
            async def tick(data: dict[str, Any]) -> None:
                received.append(data["n"])
                if data["n"] == missed:
                    live.set()

            url = f"http://{address}"
            observer = socketio.AsyncClient()  # stays in the room: the events are delivered
            await observer.connect(url, transports=["websocket"])
            await observer.call("join", "room")
            await client.connect(url, transports=["websocket"], auth=state.auth)
            await client.call("join", "room")
            await sio.emit("tick", {"n": -1}, to="room")  # the client's offset
            await _until(lambda: bool(received))
            client.eio.ws._response.connection.transport.abort()  # away (the network went)
            await _until(lambda: len(sio.manager.rooms["/"]["room"]) == 1 and not client.connected)
            for n in range(missed):
                await sio.emit("tick", {"n": n}, to="room")  # delivered to the observer
            started = time.perf_counter()
            await client.connect(url, transports=["websocket"], auth=state.auth)
            await sio.emit("tick", {"n": missed}, to="room")  # the first live event
            await asyncio.wait_for(live.wait(), 60)
            elapsed = time.perf_counter() - started
            await client.disconnect()
            await observer.disconnect()
    finally:
        adapter.unguard()
        await adapter.guard.aclose()
    in_order = received == list(range(-1, missed + 1))
    print(f"recovery of {missed} missed events")
    print(
        f"  reconnect to first live event: {elapsed * 1000:.1f} ms; "
        f"recovered={state.recovered}; all {missed + 2} in order: {in_order}"
    )


async def _until(predicate: Any) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the recovery run got stuck")


def _spread(values: list[float]) -> str:
    return f"(min {min(values):.0f}, max {max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--missed", type=int, default=1000)
    parser.add_argument(
        "--payload", type=int, default=0, help="bytes of text in each event (default: none)"
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.events, args.rounds = 5, 50, 2
    asyncio.run(throughput(args.clients, args.events, args.rounds, args.payload))
    asyncio.run(recovery(args.missed))


if __name__ == "__main__":
    main()
