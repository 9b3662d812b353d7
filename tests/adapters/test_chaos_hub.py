"""Chaos and abuse over real sockets: ThreadHub under uvicorn, read by ``websockets`` clients
that read, stop reading, churn or send nonsense. No client may hold a thread's line, slow the
agent or cost another client an event."""

from __future__ import annotations

import asyncio
import inspect
import json
import textwrap
import time
from pathlib import Path

import pytest
from chaos_support import (
    Got,
    LogCapture,
    agent,
    docs_app,
    hello,
    percentile,
    read,
    scaled,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import eventually
from emitguard_adapters.starlette import STALLED, ThreadHub, allow_any
from emitguard_adapters.testing import serve

DOCS = Path(__file__).resolve().parents[2] / "docs" / "starlette.md"


def test_docs_endpoint_is_this_one() -> None:
    """The suite runs the endpoint exactly as docs/starlette.md writes it."""
    source = inspect.getsource(docs_app)
    body = source[source.index("    async def endpoint") : source.index("\n\n    return")]
    assert textwrap.dedent(body) in DOCS.read_text(encoding="utf-8")


def assert_complete(got: Got, events: int) -> None:
    assert got.seqs == list(range(1, events + 1))
    assert got.ns == list(range(events))


def resumed(first: Got, again: Got, events: int) -> list[int]:
    """The seqs a client ends with, dropping duplicates as docs/starlette.md's client does."""
    kept: list[int] = []
    for seq in first.seqs + again.seqs:
        if not kept or seq > kept[-1]:
            kept.append(seq)
    return kept


@pytest.mark.slow
async def test_fifty_clients_five_stop_reading_the_others_get_everything_in_order() -> None:
    """The must-show: 50 clients of one thread, 5 of which stop reading, 2,000 events of
    10 KB. The 45 readers get all of them in order, the agent's sends never wait for a
    socket, the 5 are closed within send_timeout and get everything when they resume."""
    events, size, send_timeout = 2000, 10_000, 0.5
    hub = ThreadHub(
        authorize=allow_any, history=events, queue_size=500, send_timeout=send_timeout
    )
    with LogCapture() as logs:
        # No keepalive pings: a client that stops reading cannot answer them, and on a loaded
        # machine uvicorn closed it for that (1011) before the hub closed it for stalling.
        async with serve(docs_app(hub), ws_ping_interval=None) as address:
            readers = [await hello(address, "t1") for _ in range(45)]
            stalled = [await hello(address, "t1") for _ in range(5)]  # never call recv()
            await eventually(lambda: hub.connections("t1") == 50)
            reading = [asyncio.create_task(read(ws, events)) for ws in readers]

            took = await agent(lambda m: hub.send("t1", m), events, size, gap=0.001)
            ended = time.perf_counter()
            await eventually(lambda: hub.connections("t1") == 45, seconds=send_timeout + 5)
            closed_after = time.perf_counter() - ended
            got = await asyncio.gather(*reading)

            resumes = []
            for ws in stalled:
                first = await read(ws, events)  # what it had, then the close
                again = await read(await hello(address, "t1", first.seqs[-1]), events)
                resumes.append((first, again))
            for ws in readers:
                await ws.close()
    for one in got:
        assert_complete(one, events)
    for first, again in resumes:
        assert first.close is not None
        assert first.close[0] == STALLED
        assert resumed(first, again, events) == list(range(1, events + 1))
        assert again.seqs[0] <= first.seqs[-1] + 1  # the replay started where it stopped
    p99 = percentile(took, 99)
    latency = percentile([x for one in got for x in one.latencies], 99)
    stalls = ", ".join(f"{waited:.2f}" for waited in sorted(logs.stalls))
    print(
        f"\nhub.send p99 {p99 * 1000:.2f} ms, max {max(took) * 1000:.2f} ms; stalled readers "
        f"stopped after their write had waited {stalls} s (send_timeout {send_timeout} s), "
        f"all {closed_after:.2f} s after the last event; readers' delivery p99 "
        f"{latency * 1000:.0f} ms"
    )
    # A send only fills queues: it never waits for a stalled reader's write (which takes
    # send_timeout to give up). The 10 ms figure is measured in benchmarks/stall.py.
    assert p99 < send_timeout / 2
    assert len(logs.stalls) == 5
    assert all(waited <= send_timeout + 0.2 for waited in logs.stalls)
    assert closed_after <= send_timeout + 1.0
    assert logs.lines() == []


async def test_leaving_during_replay_logs_nothing_and_others_are_unaffected() -> None:
    hub = ThreadHub(authorize=allow_any, history=500)
    with LogCapture() as logs:
        async with serve(docs_app(hub)) as address:
            watcher = await hello(address, "t1")
            await eventually(lambda: hub.connections("t1") == 1)
            for n in range(500):
                assert await hub.send("t1", {"type": "agent_update", "n": n, "pad": "x" * 2000})
            for _ in range(scaled(20)):  # ask for a replay of 500, leave at once
                ws = await hello(address, "t1", 0)
                ws.transport.abort()
            assert await hub.send("t1", {"type": "agent_completed"})
            seqs = []
            while not seqs or seqs[-1] < 501:
                seqs.append(json.loads(await asyncio.wait_for(watcher.recv(), 5))["seq"])
            await eventually(lambda: hub.connections("t1") == 1)
            await watcher.close()
    assert seqs == list(range(1, 502))
    assert logs.lines() == []


async def test_churn_of_the_documented_endpoint_logs_no_exception() -> None:
    """The issue's run: clients that connect, say hello (or not), maybe wait for a replay,
    and leave, over and over; meanwhile the agent emits and one client reads everything."""
    hub = ThreadHub(authorize=allow_any, history=200)
    cycles = scaled(300)
    with LogCapture() as logs:
        async with serve(docs_app(hub)) as address:
            watcher = await hello(address, "t1")
            await eventually(lambda: hub.connections("t1") == 1)

            async def churn(i: int) -> None:
                ws = await connect(f"ws://{address}/ws", ping_interval=None)
                if i % 4:
                    await ws.send(json.dumps({"thread_id": "t1", "last_seq": i % 3 or None}))
                if i % 2:
                    await asyncio.sleep(0.001 * (i % 5))
                if i % 3:
                    ws.transport.abort()  # killed
                else:
                    await ws.close()

            async def emit() -> None:
                for n in range(200):
                    assert await hub.send("t1", {"type": "agent_update", "n": n})
                    await asyncio.sleep(0.001)

            running = asyncio.create_task(emit())
            for start in range(0, cycles, 20):
                await asyncio.gather(*(churn(i) for i in range(start, start + 20)))
            await running
            got = await read_plain(watcher, 200)
            await eventually(lambda: hub.connections("t1") == 1)
            await watcher.close()
            await eventually(lambda: not hub.connections("t1"))
    assert got == list(range(1, 201))
    assert logs.lines() == []
    assert hub._writers == {}  # every churned socket was forgotten


async def read_plain(ws: object, last: int) -> list[int]:
    seqs: list[int] = []
    while not seqs or seqs[-1] < last:
        seqs.append(json.loads(await asyncio.wait_for(ws.recv(), 5))["seq"])  # type: ignore[attr-defined]
    return seqs


@pytest.mark.parametrize(
    ("hello_text", "reason"),
    [
        ('{"thread_id": "a\\ud800"}', "thread_id is not a valid thread id"),
        (json.dumps({"thread_id": "a" * 10_000}), "thread_id is not a valid thread id"),
        (json.dumps({"thread_id": "a\x00b"}), "thread_id is not a valid thread id"),
        (json.dumps({"thread_id": "a\u202eb"}), "thread_id is not a valid thread id"),
        (json.dumps({"thread_id": "../t1"}), "thread_id is not a valid thread id"),
        (json.dumps({"thread_id": "t1/x"}), "thread_id is not a valid thread id"),
        (json.dumps({"thread_id": ["t1"]}), "thread_id must be a non-empty string, got ['t1']"),
        (json.dumps({"thread_id": "t1", "last_seq": "7"}), "last_seq must be an int >= 0"),
        (json.dumps({"thread_id": "t1", "last_seq": 10**30}), ""),  # allowed: resync
        ("not json", 'the first message must be JSON {"thread_id": ..., "last_seq": ...}'),
        ("[1, 2]", "the first message must be JSON"),
        (b"\x00binary", "the first message must be JSON"),
    ],
    ids=[
        "surrogate",
        "10k-chars",
        "nul",
        "rlo",
        "dotdot",
        "slash",
        "list",
        "seq-str",
        "seq-huge",
        "not-json",
        "not-object",
        "binary",
    ],
)
async def test_hostile_hellos_are_refused_with_1008_and_log_nothing(
    hello_text: str | bytes, reason: str
) -> None:
    hub = ThreadHub(authorize=allow_any, history=10)
    with LogCapture() as logs:
        async with serve(docs_app(hub)) as address:
            async with connect(f"ws://{address}/ws") as ws:
                await ws.send(hello_text)
                if not reason:  # a valid hello: the hub answers with a resync
                    message = json.loads(await asyncio.wait_for(ws.recv(), 3))
                    assert message["type"] == "resync"
                    return
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 3)
            assert hub.connections("t1") == 0
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason.startswith(reason)
    assert len(closed.value.rcvd.reason.encode()) <= 123
    assert logs.lines() == []


async def test_a_refusal_naming_a_surrogate_closes_with_a_valid_reason() -> None:
    """A lone surrogate reached the close reason and raised UnicodeEncodeError; any text now
    becomes valid UTF-8 of at most 123 bytes."""
    hub = ThreadHub(authorize=allow_any, thread_pattern=r".+")  # lets any id through
    hub2 = ThreadHub(authorize=lambda websocket, thread_id: False, thread_pattern=r".+")
    for one in (hub, hub2):
        with LogCapture() as logs:
            async with serve(docs_app(one)) as address, connect(f"ws://{address}/ws") as ws:
                await ws.send('{"thread_id": "a\\ud800", "last_seq": "x\\udfff"}')
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 3)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert "\\ud800" in closed.value.rcvd.reason or "\\udfff" in closed.value.rcvd.reason
        assert logs.lines() == []


async def test_slow_readers_do_not_slow_the_others() -> None:
    """Readers that read slowly, one that never reads, one that reads a little then stops:
    the fast readers' delivery latency stays what it is without them."""
    events, size = scaled(400), 2000

    async def run(with_chaos: bool) -> tuple[list[Got], float]:
        hub = ThreadHub(authorize=allow_any, history=events, queue_size=200, send_timeout=0.3)
        async with serve(docs_app(hub)) as address:
            fast = [await hello(address, "t1") for _ in range(8)]
            odd = [await hello(address, "t1") for _ in range(4 if with_chaos else 0)]
            await eventually(lambda: hub.connections("t1") == len(fast) + len(odd))

            async def slow(ws: object, pause: float) -> None:
                try:
                    while True:
                        await ws.recv()  # type: ignore[attr-defined]
                        await asyncio.sleep(pause)
                except ConnectionClosed:
                    return

            chaos = [asyncio.create_task(slow(ws, 0.01 * (i + 1))) for i, ws in enumerate(odd[:2])]
            reading = [asyncio.create_task(read(ws, events)) for ws in fast]
            took = await agent(lambda m: hub.send("t1", m), events, size, gap=0.002)
            got = await asyncio.gather(*reading)
            for ws in fast + odd:
                ws.transport.abort()
            for task in chaos:
                task.cancel()
        return got, percentile(took, 99)

    calm, _ = await run(with_chaos=False)
    rough, send_p99 = await run(with_chaos=True)
    for one in calm + rough:
        assert_complete(one, events)
    p95_calm = percentile([x for g in calm for x in g.latencies], 95)
    p95_rough = percentile([x for g in rough for x in g.latencies], 95)
    print(f"\nfast readers' p95 latency: {p95_calm * 1000:.1f} ms alone, {p95_rough * 1000:.1f} ms")
    assert p95_rough <= max(3 * p95_calm, 0.05)
    assert send_p99 < 0.3 / 2  # never waits for a stalled write (send_timeout 0.3 s)
