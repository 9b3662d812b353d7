"""``emitguard demo``: the report's race over real sockets, bare and then guarded.

A Starlette app runs under uvicorn on 127.0.0.1 (a free port) with the report's legacy manager
behind ``/ws``. Each run is one ``websockets`` client on its own thread: its first message
starts the agent, whose events race the thread association (which the endpoint makes after
the run's lag). In a share of the runs the client kills its connection mid-run (no close
handshake) and reconnects, sending the last ``seq`` it saw. The same seeded plans
(:func:`emitguard.demo.plan_runs`) are played on the bare manager and then on the manager
guarded with two lines: ``emitguard.guard(manager, stamp_seq="seq", history=...)`` and
``EmitGuardMiddleware``; the guarded endpoint also replays what a reconnecting client missed
(:func:`~emitguard_adapters.starlette.replay_to`).

``setup`` (:data:`SETUPS`) says what the guarded app adds: the guard line alone (``guard``),
plus ``EmitGuardMiddleware`` (``middleware``), or plus the resume step above (``resume``, the
default).

Unlike ``emitguard simulate`` this runs on the real clock and real sockets. The seeded plans
(lags, gaps, which runs drop, when and for how long) are the same from run to run; which event
beats which association, and what a killed connection swallowed, depend on the network and the
loop's load, so the unguarded counts vary between two runs of one seed (README.md gives
measured ranges), as do the guard's delivered/flushed split, latency, events per second,
barrier waits and wall time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

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
IDLE = 1.0
"""Seconds a client waits for more after the last message before it gives up on the run."""


class _Server:
    """The demo app: the legacy endpoint, guarded or not, and the agents it starts."""

    def __init__(
        self,
        manager: LegacyWebSocketManager,
        plans: dict[str, RunPlan],
        guard: emitguard.Guard | None,
        setup: str = "resume",
    ) -> None:
        self.manager = manager
        self.plans = plans
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
        plan = self.plans[hello["thread_id"]]
        connection = self.manager.connect(websocket, plan.user_id)
        try:
            if hello.get("resume"):
                await self._reassociate(websocket, plan, hello.get("last_seq"))
            else:
                agent = asyncio.create_task(self._agent(plan))
                self.agents.add(agent)
                await asyncio.sleep(plan.associate_after)
                self.manager.update_connection_thread(plan.user_id, plan.thread_id)
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            self.manager.disconnect(connection)

    async def _reassociate(self, websocket: WebSocket, plan: RunPlan, last_seq: Any) -> None:
        drop = plan.drop
        wait = drop.reassociate_after if drop is not None else 0.0
        if self.guard is None or self.setup != "resume":
            await asyncio.sleep(wait)
            self.manager.update_connection_thread(plan.user_id, plan.thread_id)
            return
        seq = last_seq if isinstance(last_seq, int) and last_seq >= 0 else 0
        async with self.guard.hold(plan.thread_id):  # the guarded endpoint's one addition
            await replay_to(websocket, self.guard, plan.thread_id, seq)
            await asyncio.sleep(wait)
            self.manager.update_connection_thread(plan.user_id, plan.thread_id)

    async def _agent(self, plan: RunPlan) -> None:
        await run_agent(self.manager, plan)


async def run_agent(manager: LegacyWebSocketManager, plan: RunPlan) -> None:
    """The run's agent: its events, with the plan's pauses, through the manager's send."""
    for number, event in enumerate(EVENTS, start=1):
        if number > 1:
            await asyncio.sleep(plan.gaps[number - 2])
        message = {"type": event, "thread_id": plan.thread_id, "n": number, "t": time.time()}
        await manager.send_to_thread(plan.thread_id, message)


@dataclasses.dataclass
class _Client:
    """What one client received, across its connections."""

    plan: RunPlan
    received: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    latencies: dict[Any, float] = dataclasses.field(default_factory=dict)
    last_receipt: float = 0.0
    """``time.perf_counter()`` of the last message."""

    async def run(
        self,
        address: str,
        key: str,
        *,
        agent_at: str | None = None,
        reconnect_to: str | None = None,
    ) -> None:
        """Connect to ``address`` (which starts the run's agent there, unless ``agent_at``
        names the server to start it on), read, and after a planned drop reconnect (to
        ``reconnect_to``, else ``address``) with the last ``seq`` (and ``epoch``) seen."""
        ws = await self._connect(address, {"thread_id": self.plan.thread_id})
        if agent_at is not None:
            starter = await self._connect(agent_at, {"agent": self.plan.thread_id})
            await starter.close()
        drop = self.plan.drop
        try:
            if drop is not None:
                await self._read(ws, key, until=drop.after_event, deadline=self._drop_deadline())
                ws.transport.abort()  # killed: no close handshake
                await asyncio.sleep(drop.reconnect_after)
                last = max((m.get("seq", 0) for m in self.received), default=0)
                hello = {"thread_id": self.plan.thread_id, "resume": True, "last_seq": last}
                epochs = [m["epoch"] for m in self.received if "epoch" in m]
                if epochs:  # a shared log (Redis): the cursor is (epoch, seq)
                    hello["epoch"] = epochs[-1]
                ws = await self._connect(reconnect_to or address, hello)
            await self._read(ws, key, until=len(EVENTS), deadline=None)
        finally:
            await ws.close()

    def _drop_deadline(self) -> float:
        drop = self.plan.drop
        assert drop is not None
        emitted_by = self.plan.associate_after + sum(self.plan.gaps[: drop.after_event - 1])
        return time.monotonic() + emitted_by + 0.2

    @staticmethod
    async def _connect(address: str, hello: dict[str, Any]) -> ClientConnection:
        ws = await connect(f"ws://{address}/ws", max_queue=None)
        await ws.send(json.dumps(hello))
        return ws

    async def _read(
        self, ws: ClientConnection, key: str, *, until: int, deadline: float | None
    ) -> None:
        """Read until event number ``until`` arrived, or the deadline, or an idle second."""
        while True:
            timeout = IDLE if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout)
            except (asyncio.TimeoutError, TimeoutError, ConnectionClosed):
                return
            message = json.loads(raw)
            if message.get("type") == "resync":
                continue
            self.received.append(message)
            self.latencies.setdefault(message.get(key), time.time() - message["t"])
            self.last_receipt = time.perf_counter()
            if message["n"] >= until:
                return


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
    server = _Server(manager, {plan.thread_id: plan for plan in plans}, guard, setup)
    clients = [_Client(plan) for plan in plans]
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
    clients: list[_Client],
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
