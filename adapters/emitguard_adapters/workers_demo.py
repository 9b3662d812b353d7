"""``emitguard demo --workers N``: the socket demo across N worker processes on one Redis.

Each worker is a process of its own running the demo's Starlette app under uvicorn on
127.0.0.1 (``python -m emitguard_adapters.workers_demo``). Run ``i``'s agent emits in worker
``i % N``; its client connects to worker ``(i + 1) % N`` and, when its plan drops the
connection, reconnects to worker ``(i + 2) % N``: never the worker it left, and never the
one its socket is on when the agent emits. Unguarded, each worker has its own legacy manager,
so an agent's sends find no connection in its worker ("Cannot deliver"). Guarded, each
worker's manager is guarded on the same Redis (``emitguard.guard(manager, outbox=<redis url>,
deliver=<the manager's own send>, stamp_seq="seq")``): the agent's sends go to the thread's
log, the worker holding the socket delivers them, and a reconnecting client resumes on
another worker with its cursor (``seq`` and ``epoch``), replayed from Redis.

Redis: the URL given (``--redis``; keys under a prefix of this run's own, deleted at the end),
else a ``redis-server`` started for the run on a free port when one is installed, else
``redis://127.0.0.1:6379/0`` (with this run's prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
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
)
from emitguard_adapters._access import resync_message
from emitguard_adapters.socket_demo import DEFAULTS, LEGACY_LOGGER, _result, run_agent
from emitguard_adapters.testing import LegacyWebSocketManager, bound_socket

__all__ = ["DEFAULT_REDIS", "run_workers_demo"]

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
"""The Redis the demo uses when it is given none and cannot start its own."""


# ------------------------------------------------------------------ one worker process


class _Worker:
    """The app of one worker: the legacy endpoint, guarded on Redis or not, and the agents
    that other workers' clients start here."""

    def __init__(self, config: DemoConfig, redis_url: str | None, show_logs: bool) -> None:
        self.plans = {plan.thread_id: plan for plan in plan_runs(config)}
        self.manager = LegacyWebSocketManager()
        self.guard: emitguard.Guard | None = None
        self.waits: BarrierWaits | None = None
        if redis_url is not None:
            self.guard = emitguard.guard(
                self.manager,
                outbox=redis_url,
                deliver=self.manager.send_to_thread,  # the manager's own send (before guarding)
                stamp_seq="seq",
                ready_timeout=config.barrier_timeout,
            )
            self.waits = BarrierWaits(self.guard)
            emitguard.register(self.waits)
        self.counter = contextlib.ExitStack()
        self.warnings = self.counter.enter_context(
            counting_legacy_warnings(logging.getLogger(LEGACY_LOGGER), show_logs)
        )
        self.agents: set[asyncio.Task[None]] = set()

    def app(self) -> Starlette:
        routes = [WebSocketRoute("/ws", self.endpoint), Route("/report", self.report)]
        return Starlette(routes=routes)

    async def endpoint(self, websocket: WebSocket) -> None:
        await websocket.accept()
        hello = await websocket.receive_json()
        if "agent" in hello:  # another worker's client starts its run's agent here
            agent = asyncio.create_task(run_agent(self.manager, self.plans[hello["agent"]]))
            self.agents.add(agent)
            await websocket.close()
            return
        plan = self.plans[hello["thread_id"]]
        connection = self.manager.connect(websocket, plan.user_id)
        try:
            if hello.get("resume"):
                await self._reassociate(websocket, plan, hello)
            else:
                await asyncio.sleep(plan.associate_after)
                self.manager.update_connection_thread(plan.user_id, plan.thread_id)
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            self.manager.disconnect(connection)
            if self.guard is not None:  # this worker stops delivering the thread
                self.guard.mark_disconnected(plan.thread_id, "the client's socket here closed")

    async def _reassociate(self, websocket: WebSocket, plan: RunPlan, hello: Any) -> None:
        drop = plan.drop
        wait = drop.reassociate_after if drop is not None else 0.0
        if self.guard is None:
            await asyncio.sleep(wait)
            self.manager.update_connection_thread(plan.user_id, plan.thread_id)
            return
        last = hello.get("last_seq")
        seq = last if isinstance(last, int) and last >= 0 else 0
        async with self.guard.hold(plan.thread_id):  # replay from Redis, then go live
            replay = await self.guard.areplay(plan.thread_id, after=seq, epoch=hello.get("epoch"))
            if not replay.complete:
                await websocket.send_json(resync_message(plan.thread_id, seq, replay))
            for _, message in replay.messages if replay.complete else ():
                await websocket.send_json(message)
            await asyncio.sleep(wait)
            self.manager.update_connection_thread(plan.user_id, plan.thread_id)

    async def report(self, request: Request) -> JSONResponse:
        """Once the agents here are done: the legacy warnings and what the guard recorded."""
        await asyncio.gather(*self.agents, return_exceptions=True)
        body: dict[str, Any] = {"warnings": self.warnings.cannot_deliver}
        if self.guard is not None and self.waits is not None:
            body["still"] = await self.guard.drain(5.0)
            outcomes = self.guard.stats().outcomes
            body["outcomes"] = {outcome.value: count for outcome, count in outcomes.items()}
            body["waits"] = [waited for waited in self.waits.waits if waited > 0]
        return JSONResponse(body)

    async def close(self) -> None:
        if self.guard is not None:
            emitguard.unregister(self.waits)
            await self.guard.aclose()
            emitguard.unguard(self.manager)
        self.counter.close()


async def _serve_worker(config: DemoConfig, redis_url: str | None, show_logs: bool) -> None:
    import uvicorn

    worker = _Worker(config, redis_url, show_logs)
    sock = bound_socket()
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(worker.app(), log_level="error", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.005)
        print(f"ready {host}:{port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        server.should_exit = True
        await task
    finally:
        sock.close()
        await worker.close()


# ------------------------------------------------------------------------- the driver


class _Pool:
    """N worker processes of one scenario; each stops when its stdin closes."""

    def __init__(
        self, count: int, config: DemoConfig, redis_url: str | None, show_logs: bool
    ) -> None:
        blob = json.dumps(
            {"config": dataclasses.asdict(config), "redis": redis_url, "show_logs": show_logs}
        )
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "emitguard_adapters.workers_demo", blob],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]
        self.addresses: list[str] = []
        try:
            for process in self.processes:
                assert process.stdout is not None
                line = process.stdout.readline().split()
                if line[:1] != ["ready"]:
                    raise RuntimeError("a demo worker did not start (see its output above)")
                self.addresses.append(line[1])
        except BaseException:
            self.close()
            raise

    def reports(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for address in self.addresses:
            with urllib.request.urlopen(f"http://{address}/report", timeout=60) as answer:
                found.append(json.loads(answer.read()))
        return found

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(OSError):
                assert process.stdin is not None
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


IDLE = 3.0
"""Seconds without a message after which a client stops reading (the run is over). At 1 s,
a loaded 2-core machine (delivery p99 near 0.7 s) made guarded runs lose a few events to the
client giving up."""


@dataclasses.dataclass
class _Client:
    """What one client received, across its connections (workers demo: the steps of a run are
    in several processes, so they follow the plan's clock, not the in-process script of the
    single-process demo)."""

    plan: RunPlan
    received: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    latencies: dict[Any, float] = dataclasses.field(default_factory=dict)
    last_receipt: float = 0.0
    """``time.perf_counter()`` of the last message."""

    async def run(self, address: str, key: str, *, agent_at: str, reconnect_to: str) -> None:
        """Connect to ``address``, start the run's agent on ``agent_at``, read, and after a
        planned drop reconnect to ``reconnect_to`` with the last ``seq`` and ``epoch`` seen."""
        ws = await self._connect(address, {"thread_id": self.plan.thread_id})
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
                if epochs:  # the cursor on a shared log is (epoch, seq)
                    hello["epoch"] = epochs[-1]
                ws = await self._connect(reconnect_to, hello)
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


async def _play(
    name: str, plans: list[RunPlan], addresses: list[str], progress: Progress | None
) -> tuple[list[_Client], float]:
    clients = [_Client(plan) for plan in plans]
    key = "seq" if name == "guarded" else "n"
    count = len(addresses)
    done = 0

    async def one(client: _Client) -> None:
        nonlocal done
        index = client.plan.index
        await client.run(
            addresses[(index + 1) % count],
            key,
            agent_at=addresses[index % count],
            reconnect_to=addresses[(index + 2) % count],
        )
        done += 1
        if progress is not None:
            progress(name, done, len(clients))

    if progress is not None:
        progress(name, 0, len(clients))
    started = time.perf_counter()
    await asyncio.gather(*(one(client) for client in clients))
    return clients, started


def _scenario(
    name: str,
    config: DemoConfig,
    plans: list[RunPlan],
    workers: int,
    redis_url: str | None,
    progress: Progress | None,
    show_logs: bool,
) -> ScenarioResult:
    pool = _Pool(workers, config, redis_url, show_logs)
    try:
        clients, started = asyncio.run(_play(name, plans, pool.addresses, progress))
        reports = pool.reports()
        wall = time.perf_counter() - started
    finally:
        pool.close()
    key = "seq" if redis_url is not None else "n"
    active = max((c.last_receipt for c in clients), default=started) - started
    outcomes: dict[str, int] | None = None
    still: int | None = None
    if redis_url is not None:
        outcomes, still = {}, sum(report["still"] for report in reports)
        for report in reports:
            for outcome, count in report["outcomes"].items():
                outcomes[outcome] = outcomes.get(outcome, 0) + count
    result = _result(name, plans, clients, key, wall, active, still, None)
    warnings = sum(report["warnings"] for report in reports)
    result = dataclasses.replace(result, legacy_warnings=warnings, outcomes=outcomes)
    if redis_url is None:
        return result
    held = [waited for report in reports for waited in report["waits"]]
    return dataclasses.replace(
        result,
        held=len(held),
        barrier_wait_p50=percentile(held, 50),
        barrier_wait_p99=percentile(held, 99),
    )


@contextlib.contextmanager
def _redis(url: str | None) -> Iterator[str]:
    """The Redis URL of one demo, with a key prefix of its own (its keys deleted after)."""
    prefix = f"emitguard-demo-{secrets.token_hex(4)}"
    if url is None and shutil.which("redis-server") is not None:
        with _own_redis() as own:
            yield f"{own}?prefix={prefix}"
        return
    base = url or DEFAULT_REDIS
    try:
        yield f"{base}{'&' if '?' in base else '?'}prefix={prefix}"
    finally:
        with contextlib.suppress(Exception):
            import redis

            with redis.Redis.from_url(base) as client:
                for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                    client.delete(key)


@contextlib.contextmanager
def _own_redis() -> Iterator[str]:
    """A ``redis-server`` of this run on a free port (no persistence), stopped after it."""
    with tempfile.TemporaryDirectory(prefix="emitguard-demo-") as directory:
        sock = bound_socket()
        port = sock.getsockname()[1]
        sock.close()
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", directory, "--logfile", f"{directory}/log"]
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), 0.2
                ) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {port}")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.kill()
            server.wait()


def run_workers_demo(
    config: DemoConfig = DEFAULTS,
    *,
    workers: int = 2,
    redis_url: str | None = None,
    progress: Progress | None = None,
    show_legacy_logs: bool = False,
) -> DemoReport:
    """Run both scenarios across ``workers`` processes (at least 2), the guarded one on Redis
    (``redis_url``, or see the module docs)."""
    if workers < 2:
        raise ValueError(f"workers must be at least 2, got {workers}")
    importlib.import_module("redis")  # the Redis backend's client: ImportError now, not later
    plans = plan_runs(config)
    with _redis(redis_url) as url:
        bare = _scenario("unguarded", config, plans, workers, None, progress, show_legacy_logs)
        safe = _scenario("guarded", config, plans, workers, url, progress, show_legacy_logs)
    return DemoReport(config, bare, safe, setup="resume", clock="network", workers=workers)


def _main(blob: str) -> None:
    given = json.loads(blob)
    config = DemoConfig(**given["config"])
    asyncio.run(_serve_worker(config, given["redis"], given["show_logs"]))


if __name__ == "__main__":
    _main(sys.argv[1])
