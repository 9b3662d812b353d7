"""emitguard Channels benchmark: a guarded channel layer against the bare one.

    python benchmarks/channels_layer.py [--groups N] [--events N] [--rounds N]

In one run, for the in-memory layer and for channels_redis's ``RedisChannelLayer`` (against a
``redis-server`` this script starts on a free port): ``groups`` conversations, each one
tutorial consumer under ``WebsocketCommunicator`` and one agent awaiting ``group_send`` for
``events`` events (Redis channels with a capacity that drops none of the bare run's);
events/s is counted from the first send until every client received every event.
Bare: the plain consumer and layer. Guarded: ``guard_layer(layer)`` (confirmation on) and the
consumer with ``GuardedConsumerMixin``. Each figure is the median of ``rounds``
rounds, bare and guarded alternating; the target is guarded >= 0.85x bare.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

from django.conf import settings

if not settings.configured:
    settings.configure(
        CHANNEL_LAYERS={"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    )

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer, channel_layers
from channels.testing import WebsocketCommunicator

import emitguard
from emitguard_adapters.channels import GuardedConsumerMixin, guard_layer

TARGET = 0.85


class Chat(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        self.room = self.scope["url_route"]["kwargs"]["room"]
        await self.channel_layer.group_add(self.room, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.room, self.channel_name)

    async def chat_event(self, event: dict[str, Any]) -> None:
        await self.send_json({"n": event["n"]})


class GuardedChat(GuardedConsumerMixin, Chat):
    pass


async def one_round(layer: Any, guarded: bool, groups: int, events: int) -> float:
    """Events/s of one round."""
    channel_layers.set("default", layer)
    if guarded:
        guard_layer(layer)
    consumer = GuardedChat if guarded else Chat
    clients = []
    for index in range(groups):
        client = WebsocketCommunicator(consumer.as_asgi(), "/ws/")
        client.scope["url_route"] = {"kwargs": {"room": f"g{index}"}}
        assert (await client.connect())[0]
        clients.append(client)

    async def agent(room: str) -> None:
        for n in range(events):
            await layer.group_send(room, {"type": "chat.event", "n": n})

    async def reader(client: WebsocketCommunicator) -> None:
        for _ in range(events):
            await client.receive_json_from(timeout=10)

    started = time.perf_counter()
    await asyncio.gather(
        *(agent(f"g{i}") for i in range(groups)), *(reader(client) for client in clients)
    )
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.disconnect()
    if guarded:
        emitguard.unguard(layer)
    return groups * events / elapsed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def compare(make: Any, label: str, groups: int, events: int, rounds: int) -> float:
    bare: list[float] = []
    guarded: list[float] = []
    for _ in range(rounds):
        bare.append(await one_round(make(), False, groups, events))
        guarded.append(await one_round(make(), True, groups, events))
    b, g = statistics.median(bare), statistics.median(guarded)
    print(
        f"{label:9s} bare {b:9.0f} events/s  guarded {g:9.0f} events/s  ratio {g / b:.2f}x "
        f"(target {TARGET}x; rounds bare {[round(x) for x in bare]} "
        f"guarded {[round(x) for x in guarded]})"
    )
    return g / b


async def run(groups: int, events: int, rounds: int, redis_port: int | None) -> None:
    await compare(InMemoryChannelLayer, "in-memory", groups, events, rounds)
    if redis_port is None:
        print("redis: redis-server is not installed; skipped")
        return
    from channels_redis.core import RedisChannelLayer

    await compare(
        lambda: RedisChannelLayer(hosts=[("127.0.0.1", redis_port)], capacity=100_000),
        "redis",
        groups,
        events,
        rounds,
    )


def start_redis(folder: str) -> tuple[subprocess.Popen[bytes] | None, int | None]:
    """A ``redis-server`` on a free port, up (or nothing, when it is not installed)."""
    server = shutil.which("redis-server")
    if server is None:
        return None, None
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            break
        except OSError:
            time.sleep(0.02)
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        process, port = start_redis(folder)
        try:
            asyncio.run(run(args.groups, args.events, args.rounds, port))
        finally:
            if process is not None:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
