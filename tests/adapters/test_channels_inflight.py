"""Sends confirmed behind on a Channels layer, at their edges: a client resuming while sends
are in flight, an association from another loop, cancelled and failing sends (no tag left
behind), a handler that dispatches another message, tags from another process. Real consumers
under WebsocketCommunicator, the in-memory layer."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any, ClassVar

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer, channel_layers
from channels.testing import WebsocketCommunicator
from test_channels import (
    GuardedConsumerMixin,
    connected,
    received,
)

import emitguard
from conftest import eventually
from emitguard import ConnectionState, Outcome, transport
from emitguard_adapters.channels import guard_layer


class Gated(GuardedConsumerMixin, AsyncJsonWebsocketConsumer):
    """A live consumer in group "gated" whose handlers hold each event until ``gate`` opens."""

    gate: ClassVar[asyncio.Event]

    async def connect(self) -> None:
        await self.channel_layer.group_add("gated", self.channel_name)
        await self.accept()

    async def chat_event(self, event: dict[str, Any]) -> None:
        await self.gate.wait()
        await self.send_json({"n": event["n"], "seq": event["seq"]})


class GatedResuming(Gated):
    """:class:`Gated` in group "room", joined with ``join_group`` (replay on ``?after=``)."""

    async def connect(self) -> None:
        await self.accept()
        await self.join_group("room")


async def gated_client(gate: asyncio.Event) -> WebsocketCommunicator:
    client = WebsocketCommunicator(type("G", (Gated,), {"gate": gate}).as_asgi(), "/ws/")
    assert (await client.connect())[0]
    return client


async def client_for(gate: asyncio.Event, query: str = "") -> WebsocketCommunicator:
    app = type("C", (GatedResuming,), {"gate": gate}).as_asgi()
    client = WebsocketCommunicator(app, f"/ws/{query}")
    assert (await client.connect())[0]
    return client


async def test_a_client_resuming_while_sends_are_in_flight_gets_them_once() -> None:
    """A client comes back with ?after=2 while seqs 3 and 4 are in flight to the old, slow
    but alive consumer: join_group's hold waits for them to land, so the replay has them."""
    layer = InMemoryChannelLayer()
    channel_layers.set("default", layer)
    guard = guard_layer(layer, stamp_seq="seq", history=50)
    old_gate = asyncio.Event()
    old_gate.set()
    old = await client_for(old_gate)
    for n in (1, 2):
        await layer.group_send("room", {"type": "chat.event", "n": n})
    assert [m["seq"] for m in await received(old, 2)] == [1, 2]
    old_gate.clear()  # the old consumer slows down: 3 and 4 go in flight
    sends = []
    for n in (3, 4):
        sends.append(asyncio.create_task(layer.group_send("room", {"type": "chat.event", "n": n})))
        await asyncio.sleep(0.02)
    assert guard.stats().in_flight == {"room": 2}
    new_gate = asyncio.Event()
    new_gate.set()
    new = await client_for(new_gate, "?after=2")  # join_group: hold + areplay + group_add
    old_gate.set()  # the old consumer sends 3 and 4: they land, delivered
    await asyncio.gather(*sends)
    await layer.group_send("room", {"type": "chat.event", "n": 5})
    got = [(await new.receive_json_from(timeout=2))["seq"]]
    while not await new.receive_nothing(0.2):
        got.append((await new.receive_json_from(timeout=2))["seq"])
    assert await guard.drain(2.0) == 0
    await old.disconnect()
    await new.disconnect()
    emitguard.unguard(layer)
    assert got == [3, 4, 5], got


async def test_an_association_from_another_loop_while_sends_are_in_flight() -> None:
    """A group_add made on another, short-lived loop (a sync view's async_to_sync) while
    sends are in flight: they still land on the loop they were handed over on (the
    confirmer once spun forever, its landings sent to the closed loop)."""
    import faulthandler

    faulthandler.dump_traceback_later(60, exit=True, file=sys.stderr)  # (a spin: fail loudly)
    try:
        layer = InMemoryChannelLayer()
        channel_layers.set("default", layer)
        guard = guard_layer(layer, confirm=0.2, stamp_seq="seq")
        gate = asyncio.Event()
        client = await gated_client(gate)
        for n in (1, 2, 3):
            await asyncio.wait_for(layer.group_send("gated", {"type": "chat.event", "n": n}), 2)
        assert guard.stats().in_flight == {"gated": 3}
        # a group_add made from another thread with its own (short-lived) loop
        t = threading.Thread(target=lambda: asyncio.run(layer.group_add("gated", "x.other")))
        t.start()
        t.join()
        gate.set()
        got = [m["seq"] for m in await received(client, 3)]
        assert got == [1, 2, 3]
        await asyncio.sleep(0.5)  # the confirmer wakes, and ends
        assert guard.stats().in_flight == {}, guard.stats().in_flight
        await client.disconnect()
        emitguard.unguard(layer)
    finally:
        faulthandler.cancel_dump_traceback_later()


class SlowLayer(InMemoryChannelLayer):
    """A layer whose group_send suspends after enqueueing (as a network layer does)."""

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await super().group_send(group, message)
        await asyncio.sleep(0.5)


async def test_a_cancelled_group_send_leaves_no_tag_behind() -> None:
    layer = SlowLayer()
    channel_layers.set("default", layer)
    guard = guard_layer(layer, confirm=0.2, stamp_seq="seq")
    client = await connected(layer, "c1")
    task = asyncio.create_task(layer.group_send("c1", {"type": "chat.event", "n": 1}))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await received(client, 1)
    await guard.drain(2.0)
    await client.disconnect()
    emitguard.unguard(layer)
    assert transport._tagged == {}, transport._tagged


class RaisingLayer(InMemoryChannelLayer):
    fail = False

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("layer down")
        await super().group_send(group, message)


async def test_a_failing_group_send_on_the_general_path_leaves_no_tag_behind() -> None:
    layer = RaisingLayer()
    channel_layers.set("default", layer)
    guard = guard_layer(layer, confirm=0.2, stamp_seq="seq", retry_backoff=(0.01,))
    transport._tagged.clear()
    layer.fail = True
    # before any group_add: the send parks (general path), then is tried when c1 joins
    early = asyncio.create_task(layer.group_send("c1", {"type": "chat.event", "n": 1}))
    await asyncio.sleep(0.05)
    client = await connected(layer, "c1")
    await asyncio.gather(early, return_exceptions=True)
    await asyncio.sleep(0.1)
    layer.fail = False
    await guard.drain(2.0)
    await client.disconnect()
    emitguard.unguard(layer)
    assert transport._tagged == {}, transport._tagged


class Joiner(GuardedConsumerMixin, AsyncJsonWebsocketConsumer):
    """Joins a room on request (a message to its personal group), replaying the room."""

    async def connect(self) -> None:
        await self.channel_layer.group_add("user-1", self.channel_name)
        await self.accept()

    async def user_join(self, event: dict[str, Any]) -> None:
        await self.join_group(event["room"], after=0)  # replays through self.dispatch
        await self.send_json({"joined": event["room"], "seq": event["seq"]})

    async def chat_event(self, event: dict[str, Any]) -> None:
        await self.send_json({"n": event["n"], "seq": event["seq"]})


async def test_a_handler_that_dispatches_a_replay_keeps_its_own_tag(records: Any) -> None:
    """join_group's replay dispatches inside the handler of a tagged message; the handler's
    own frame after it still confirms its send (once, the outer tag was wiped: the send was
    kept and the client got the replay and the ack twice)."""
    layer = InMemoryChannelLayer()
    channel_layers.set("default", layer)
    guard = guard_layer(layer, confirm=0.2, retry_backoff=(0.01,), stamp_seq="seq", history=10)
    other = await connected(layer, "room")
    await layer.group_send("room", {"type": "chat.event", "n": 1})
    await received(other, 1)
    client = WebsocketCommunicator(Joiner.as_asgi(), "/ws/")
    assert (await client.connect())[0]
    await layer.group_send("user-1", {"type": "user.join", "room": "room"})
    frames = []
    while not await client.receive_nothing(0.6):
        frames.append(await client.receive_json_from(timeout=2))
    await guard.drain(2.0)
    mine = [(r.thread_id, r.seq, r.outcome) for r in records.items if r.guard_name == guard.name]
    await client.disconnect()
    await other.disconnect()
    emitguard.unguard(layer)
    joined = [f for f in frames if "joined" in f]
    assert len(joined) == 1, (frames, mine)


def other_process_tag_prefix() -> str:
    code = "from emitguard import transport; print(transport._TAG_PREFIX)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


async def test_a_tag_from_another_process_confirms_nothing_here(records: Any) -> None:
    """Tags travel through a shared layer (Redis): a message another process's guard tagged,
    handled by a consumer here, must not confirm a send of this process that happens to have
    the same number (here one to a dead consumer: it would be recorded DELIVERED, and lost).
    Each process's tags carry a random prefix of their own."""
    layer = InMemoryChannelLayer()
    channel_layers.set("default", layer)
    guard = guard_layer(layer, confirm=0.2, retry_backoff=(0.01,), stamp_seq="seq")
    live = await connected(layer, "other")
    dead = await layer.new_channel()
    await layer.group_add("deadg", dead)
    await layer.group_send("deadg", {"type": "chat.event", "n": 1})
    (mine_tag,) = [t for t, p in transport._tagged.items() if p.landed is not None]
    theirs = await asyncio.to_thread(other_process_tag_prefix)  # for the same count
    prefix, _, count = mine_tag.rpartition(".")
    assert theirs
    assert theirs != prefix + "."
    k = theirs + count
    await layer.send(
        next(iter(layer.groups["other"])),
        {"type": "chat.event", "n": 99, "seq": None, "_emitguard_tag": k},
    )
    await received(live, 1)
    await asyncio.sleep(0.5)
    mine = [(r.thread_id, r.seq, r.outcome) for r in records.items if r.guard_name == guard.name]
    await live.disconnect()
    emitguard.unguard(layer)
    assert ("deadg", 1, Outcome.DELIVERED) not in mine, mine
    assert ("deadg", 1, Outcome.BUFFERED) in mine, mine


def outcomes_by_seq(records: Any, guard: emitguard.Guard) -> dict[int, list[Outcome]]:
    found: dict[int, list[Outcome]] = {}
    for record in records.items:
        if record.guard_name == guard.name:
            found.setdefault(record.seq, []).append(record.outcome)
    return found


async def test_an_agent_is_not_held_up_until_each_frame_leaves(records: Any) -> None:
    layer = InMemoryChannelLayer()
    guard = guard_layer(layer, stamp_seq="seq")
    channel_layers.set("default", layer)
    gate = asyncio.Event()
    client = await gated_client(gate)
    for n in range(1, 21):  # handed over one after another; no frame has left yet
        await asyncio.wait_for(layer.group_send("gated", {"type": "chat.event", "n": n}), 5)
    assert outcomes_by_seq(records, guard) == {}  # none confirmed: none recorded
    assert guard.stats().in_flight == {"gated": 20}
    assert await client.receive_nothing(0.05)
    gate.set()
    got = await received(client, 20)
    assert [item["seq"] for item in got] == list(range(1, 21))
    assert await guard.drain(2.0) == 0
    # each recorded once, when its frame left, in seq order
    assert [r.seq for r in records.items if r.guard_name == guard.name] == list(range(1, 21))
    assert {r.outcome for r in records.items if r.guard_name == guard.name} == {
        Outcome.DELIVERED
    }
    assert transport._tagged == {}  # every tag let go once its send was decided
    await client.disconnect()
    emitguard.unguard(layer)
    assert "group_send" not in vars(layer)


async def test_sends_in_flight_to_a_dead_consumer_are_kept_in_order_and_sent_again(
    records: Any,
) -> None:
    layer = InMemoryChannelLayer()
    guard = guard_layer(layer, confirm=0.1, retry_backoff=(0.01,), stamp_seq="seq")
    dead_channel = await layer.new_channel()  # in the group, never read
    await layer.group_add("c1", dead_channel)
    for n in range(1, 6):  # handed over at once, all five
        await layer.group_send("c1", {"type": "chat.event", "n": n})
    await eventually(lambda: guard.state("c1") is ConnectionState.DISCONNECTED)
    assert guard.stats().pending == {"c1": 5}
    client = await connected(layer, "c1")
    assert [item["seq"] for item in await received(client, 5)] == [1, 2, 3, 4, 5]
    assert await client.receive_nothing(0.2)
    assert await guard.drain(1.0) == 0
    ended = outcomes_by_seq(records, guard)
    assert set(ended) == {1, 2, 3, 4, 5}
    for seq, outcomes in ended.items():  # kept (with its retry, for the first), then flushed
        assert outcomes[-1] is Outcome.FLUSHED, (seq, outcomes)
        assert set(outcomes[:-1]) == {Outcome.BUFFERED}, (seq, outcomes)
    await client.disconnect()
    emitguard.unguard(layer)


async def test_a_consumer_that_joins_while_sends_are_in_flight_gets_them_first() -> None:
    # The older sends went to a consumer that died with them; a newer consumer joins before
    # that is known. The sends made after it joined must not reach it first: they wait until
    # the older ones are confirmed or kept, and it gets every event in order.
    layer = InMemoryChannelLayer()
    guard = guard_layer(layer, confirm=0.1, retry_backoff=(0.01,), stamp_seq="seq")
    dead_channel = await layer.new_channel()
    await layer.group_add("c1", dead_channel)
    for n in range(1, 4):
        await layer.group_send("c1", {"type": "chat.event", "n": n})
    client = await connected(layer, "c1")
    for n in range(4, 7):
        await layer.group_send("c1", {"type": "chat.event", "n": n})
    assert [item["n"] for item in await received(client, 6)] == [1, 2, 3, 4, 5, 6]
    assert await client.receive_nothing(0.2)
    assert await guard.drain(1.0) == 0
    await client.disconnect()
    emitguard.unguard(layer)

