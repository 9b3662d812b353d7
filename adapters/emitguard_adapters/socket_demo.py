"""``emitguard demo``: the report's race over real sockets, bare and then guarded.

A Starlette app runs under uvicorn on 127.0.0.1 (a free port) with the report's legacy manager
behind ``/ws``. Each run is one ``websockets`` client on its own thread: its first message
starts the agent, whose first events go out before the thread association (which the endpoint
makes after the run's lag). In a share of the runs the connection drops mid-run (the client
kills it without a close handshake, at once or after it silently swallowed what arrived
meanwhile) and the client reconnects, sending the last ``seq`` it kept. The same seeded plans
(:func:`emitguard.demo.plan_runs`) are played on the bare manager and then on the manager
guarded with two lines: ``emitguard.guard(manager, stamp_seq="seq", history=...)`` and
``EmitGuardMiddleware``; the guarded endpoint also replays what a reconnecting client missed
(:func:`~emitguard_adapters.starlette.replay_to`).

``setup`` (:data:`SETUPS`) says what the guarded app adds: the guard line alone (``guard``),
plus ``EmitGuardMiddleware`` (``middleware``), or plus the resume step above (``resume``, the
default).

Unlike ``emitguard simulate`` this runs on the real clock and real sockets, but the order of
each run's steps is fixed by its seeded plan (:mod:`emitguard_adapters._demo_script`): the
server starts a run's agent, associates its thread, tells the client when to drop (a ``drop``
frame) and when the run is over (an ``end`` frame), and every step waits for the steps the
plan puts before it. Which threads run, which events each agent sends, which clients drop
after which event and how (silently or noticed), and so every count of what the clients
received, are the same on every run of a seed. Latency, events per second, barrier waits,
wall time and the guarded manager's warnings (the guard's retry backoff runs on the real
clock) vary (:data:`emitguard.demo.VARIES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import emitguard
from emitguard.demo import (
    EVENTS,
    BarrierWaits,
    DemoConfig,
    DemoReport,
    Progress,
    RunPlan,
    ScenarioResult,
    counting_legacy_warnings,
    percentile,
    plan_runs,
    scenario_result,
    tally,
)
from emitguard_adapters._demo_script import Script
from emitguard_adapters.starlette import EmitGuardMiddleware, replay_to
from emitguard_adapters.testing import LegacyWebSocketManager, serve

__all__ = ["DEFAULTS", "SETUPS", "run_socket_demo"]

DEFAULTS = DemoConfig(runs=200, lag=0.05, drop_rate=0.2)
"""The command's defaults: 200 concurrent clients, a fifth of them dropping once."""

SETUPS: tuple[str, ...] = ("guard", "middleware", "resume")
"""What the guarded scenario adds to the legacy app: ``guard`` only the
``emitguard.guard(manager, ...)`` line; ``middleware`` also ``EmitGuardMiddleware``;
``resume`` also replays what a reconnecting client missed (``guard.hold`` +
:func:`~emitguard_adapters.starlette.replay_to` with the client's last ``seq``)."""

LEGACY_LOGGER = "emitguard.testing.legacy"
DROP, END, RESYNC = "drop", "end", "resync"
"""The frames the demo's server sends a client besides events: drop the connection now,
the run is over, and :func:`~emitguard_adapters.starlette.replay_to`'s own resync."""
SETTLE, POLL = 5.0, 0.005
"""Seconds the server waits for the guard to empty a thread's queue before it goes on, and
how often it looks."""
GIVE_UP = 30.0
"""Seconds a client waits for a frame before it gives up on the run (a broken server)."""


class _Server:
    """The demo app: the legacy endpoint, guarded or not, and the agents it starts."""

    def __init__(
        self,
        manager: LegacyWebSocketManager,
        scripts: dict[str, Script],
        guard: emitguard.Guard | None,
        setup: str = "resume",
    ) -> None:
        self.manager = manager
        self.scripts = scripts
        self.guard = guard
        self.setup = setup
        self.agents: set[asyncio.Task[None]] = set()

    def app(self) -> Any:
        app = Starlette(routes=[WebSocketRoute("/ws", self.endpoint)])
        if self.guard is None or self.setup == "guard":
            return app
        return EmitGuardMiddleware(app, guard=self.guard)

    async def endpoint(self, websocket: WebSocket) -> None:
        await websocket.accept()
        hello = await websocket.receive_json()
        script = self.scripts[hello["thread_id"]]
        plan = script.plan
        resume = bool(hello.get("resume"))
        connection = self.manager.connect(websocket, plan.user_id)
        steps = asyncio.create_task(self._steps(websocket, script, resume, hello.get("last_seq")))
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            self.manager.disconnect(connection)
            if not resume:
                script.old_closed.set()
            if not steps.done():
                steps.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await steps

    async def _steps(
        self, websocket: WebSocket, script: Script, resume: bool, last_seq: Any
    ) -> None:
        """This connection's part of the run, each step after those the timeline puts first."""
        plan, line = script.plan, script.timeline
        if resume:
            script.reconnected.set()
            await self._reassociate(websocket, script, last_seq)
            script.reassociated.set()
        else:
            agent = asyncio.create_task(self._agent(script))
            self.agents.add(agent)
            await asyncio.sleep(plan.associate_after)
            await script.ready_to_associate()
            self.manager.update_connection_thread(plan.user_id, plan.thread_id)
            script.associated.set()
            if plan.drop is not None:
                await script.completed.reach(line.before_drop)
                await self._settled(plan.thread_id)
                await websocket.send_json({"type": DROP})  # the client drops after this frame
                if line.silent:
                    script.dropped.set()
                return
        await script.completed.reach(len(EVENTS))
        await self._settled(plan.thread_id)
        await websocket.send_json({"type": END})

    async def _settled(self, thread_id: str) -> None:
        """Wait until the guard has nothing left queued for the thread (bounded)."""
        if self.guard is None:
            return
        for _ in range(int(SETTLE / POLL)):  # the guard has no per-thread drain to await
            if not await self.guard.pending(thread_id):
                return
            await asyncio.sleep(POLL)

    async def _reassociate(self, websocket: WebSocket, script: Script, last_seq: Any) -> None:
        plan = script.plan
        drop = plan.drop
        wait = drop.reassociate_after if drop is not None else 0.0
        await asyncio.sleep(wait)
        await script.completed.reach(script.timeline.before_reassociation)
        if self.guard is None or self.setup != "resume":
            self.manager.update_connection_thread(plan.user_id, plan.thread_id)
            return
        seq = last_seq if isinstance(last_seq, int) and last_seq >= 0 else 0
        async with self.guard.hold(plan.thread_id):  # the guarded endpoint's one addition
            await replay_to(websocket, self.guard, plan.thread_id, seq)
            self.manager.update_connection_thread(plan.user_id, plan.thread_id)

    async def _agent(self, script: Script) -> None:
        plan = script.plan
        for number, event in enumerate(EVENTS, start=1):
            if number > 1:
                await asyncio.sleep(plan.gaps[number - 2])
            await script.before_event(number)
            message = {"type": event, "thread_id": plan.thread_id, "n": number, "t": time.time()}
            send = asyncio.ensure_future(self.manager.send_to_thread(plan.thread_id, message))
            await asyncio.sleep(0)  # the send has looked at the thread's connections
            await script.handed.bump()
            await send
            await script.completed.bump()


class _Received(Protocol):
    """What :func:`_result` reads of a client (this demo's, or the workers demo's)."""

    @property
    def plan(self) -> RunPlan: ...

    received: list[dict[str, Any]]
    latencies: dict[Any, float]


async def run_agent(manager: LegacyWebSocketManager, plan: RunPlan) -> None:
    """A run's agent with no script (``emitguard demo --workers``, where the steps of a run
    are in several processes): its events, with the plan's pauses, through the manager."""
    for number, event in enumerate(EVENTS, start=1):
        if number > 1:
            await asyncio.sleep(plan.gaps[number - 2])
        message = {"type": event, "thread_id": plan.thread_id, "n": number, "t": time.time()}
        await manager.send_to_thread(plan.thread_id, message)


@dataclasses.dataclass
class _Client:
    """What one client received, across its connections."""

    script: Script
    received: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    latencies: dict[Any, float] = dataclasses.field(default_factory=dict)
    last_receipt: float = 0.0
    """``time.perf_counter()`` of the last message."""

    @property
    def plan(self) -> RunPlan:
        return self.script.plan

    async def run(self, address: str, key: str) -> None:
        script = self.script
        plan = script.plan
        ws = await self._connect(address, {"thread_id": plan.thread_id})
        drop = plan.drop
        try:
            if drop is not None:
                await self._read(ws, key, until=DROP)
                ws = await self._reconnect(ws, address)
            await self._read(ws, key, until=END)
        finally:
            await ws.close()

    async def _reconnect(self, ws: ClientConnection, address: str) -> ClientConnection:
        """Drop the connection as the plan says, then come back on a new one."""
        script = self.script
        drop = script.plan.drop
        assert drop is not None
        if script.timeline.silent:
            swallow = asyncio.create_task(_swallow(ws))  # what arrives now is lost
            await asyncio.sleep(drop.reconnect_after)
            await script.completed.reach(script.timeline.before_reconnect)
            ws.transport.abort()  # killed: no close handshake
            await swallow
            await script.old_closed.wait()
        else:
            ws.transport.abort()
            await script.old_closed.wait()
            script.dropped.set()
            await asyncio.sleep(drop.reconnect_after)
            await script.completed.reach(script.timeline.before_reconnect)
        last = max((m.get("seq", 0) for m in self.received), default=0)
        hello = {"thread_id": script.plan.thread_id, "resume": True, "last_seq": last}
        return await self._connect(address, hello)

    @staticmethod
    async def _connect(address: str, hello: dict[str, Any]) -> ClientConnection:
        ws = await connect(f"ws://{address}/ws", max_queue=None)
        await ws.send(json.dumps(hello))
        return ws

    async def _read(self, ws: ClientConnection, key: str, *, until: str) -> None:
        """Keep what arrives until the server's ``until`` frame (or a quiet ``GIVE_UP``)."""
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), GIVE_UP)
            except (asyncio.TimeoutError, TimeoutError, ConnectionClosed):
                return
            message = json.loads(raw)
            kind = message.get("type")
            if kind == until:
                return
            if kind in (RESYNC, DROP, END):
                continue
            self.received.append(message)
            self.latencies.setdefault(message.get(key), time.time() - message["t"])
            self.last_receipt = time.perf_counter()


async def _swallow(ws: ClientConnection) -> None:
    """Read and forget until the connection dies."""
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


async def _scenario(
    name: str, config: DemoConfig, plans: list[RunPlan], progress: Progress | None, setup: str
) -> ScenarioResult:
    manager = LegacyWebSocketManager()
    guard = None
    if name == "guarded":
        guard = emitguard.guard(
            manager, stamp_seq="seq", history=64, ready_timeout=config.barrier_timeout
        )
    listener = BarrierWaits(guard) if guard is not None else None
    if listener is not None:
        emitguard.register(listener)
    scripts = {plan.thread_id: Script(plan, gated=guard is not None) for plan in plans}
    server = _Server(manager, scripts, guard, setup)
    clients = [_Client(script) for script in scripts.values()]
    key = "seq" if guard is not None else "n"
    done = 0

    async def one(client: _Client) -> None:
        nonlocal done
        await client.run(address, key)
        done += 1
        if progress is not None:
            progress(name, done, len(clients))

    started = time.perf_counter()
    try:
        async with serve(server.app()) as address:
            if progress is not None:
                progress(name, 0, len(clients))
            await asyncio.gather(*(one(client) for client in clients))
            await asyncio.gather(*server.agents)
            still = await guard.drain(config.drain_timeout) if guard is not None else None
        wall = time.perf_counter() - started
        outcomes = guard.stats().outcomes if guard is not None else None
    finally:
        if guard is not None:
            emitguard.unregister(listener)
            await guard.aclose()
            emitguard.unguard(manager)
    active = max((c.last_receipt for c in clients), default=started) - started
    result = _result(name, plans, clients, key, wall, active, still, outcomes)
    if listener is None:
        return result
    held = [waited for waited in listener.waits if waited > 0]
    return dataclasses.replace(
        result,
        held=len(held),
        barrier_wait_p50=percentile(held, 50),
        barrier_wait_p99=percentile(held, 99),
    )


def _result(
    name: str,
    plans: list[RunPlan],
    clients: Sequence[_Received],
    key: str,
    wall: float,
    active: float,
    still: int | None,
    outcomes: Any,
) -> ScenarioResult:
    got = tally({c.plan.thread_id: c.received for c in clients}, key)
    latencies = [value for c in clients for value in c.latencies.values()]
    repeated = 0
    for client in clients:
        unique = {m.get(key): m["n"] for m in client.received}
        repeated += len(unique) - len(set(unique.values()))
    return dataclasses.replace(
        scenario_result(name, plans, got, 0, wall),
        still_buffered=still,
        outcomes=None if outcomes is None else {o.value: n for o, n in outcomes.items()},
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
        events_per_s=got.delivered / active if active > 0 else None,
        repeated=repeated,
    )


async def _both(
    config: DemoConfig, progress: Progress | None, show_logs: bool, setup: str
) -> DemoReport:
    plans = plan_runs(config)
    legacy = logging.getLogger(LEGACY_LOGGER)
    results: dict[str, ScenarioResult] = {}
    for name in ("unguarded", "guarded"):
        with counting_legacy_warnings(legacy, show_logs) as counter:
            result = await _scenario(name, config, plans, progress, setup)
        results[name] = dataclasses.replace(result, legacy_warnings=counter.cannot_deliver)
    return DemoReport(
        config, results["unguarded"], results["guarded"], setup=setup, clock="network"
    )


def run_socket_demo(
    config: DemoConfig = DEFAULTS,
    *,
    progress: Progress | None = None,
    show_legacy_logs: bool = False,
    setup: str = "resume",
) -> DemoReport:
    """Run both scenarios, one after the other, over real loopback sockets; ``setup`` says
    what the guarded scenario adds to the app (one of :data:`SETUPS`)."""
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {', '.join(SETUPS)}, got {setup!r}")
    return asyncio.run(_both(config, progress, show_legacy_logs, setup))
