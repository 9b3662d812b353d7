"""Parts of the chaos-and-abuse suite: the documented hub app, clients that read, stall or
churn, an agent that times its sends, and the sizes (``EMITGUARD_CHAOS_SCALE`` multiplies
the counts of the chaos runs, for bigger runs than CI's)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from emitguard_adapters.starlette import EmitGuardMiddleware, ThreadHub

SCALE = float(os.environ.get("EMITGUARD_CHAOS_SCALE", "1"))


def scaled(count: int) -> int:
    return max(1, round(count * SCALE))


def docs_app(hub: ThreadHub) -> EmitGuardMiddleware:
    """The app of docs/starlette.md, endpoint and all (test_docs_endpoint_is_this_one)."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await hub.serve(websocket)

    return EmitGuardMiddleware(Starlette(routes=[WebSocketRoute("/ws", endpoint)]), guard=hub.guard)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def payload(n: int, size: int) -> dict[str, Any]:
    """An agent event of about ``size`` bytes carrying the time it was sent."""
    return {"type": "agent_update", "n": n, "at": time.perf_counter(), "pad": "x" * size}


async def agent(
    send: Callable[[dict[str, Any]], Awaitable[bool]], events: int, size: int, gap: float
) -> list[float]:
    """Emit ``events`` events ``gap`` seconds apart; returns how long each send took."""
    took: list[float] = []
    for n in range(events):
        started = time.perf_counter()
        assert await send(payload(n, size))
        took.append(time.perf_counter() - started)
        await asyncio.sleep(gap)
    return took


async def hello(address: str, thread_id: str, last_seq: int | None = None) -> ClientConnection:
    ws = await connect(f"ws://{address}/ws", ping_interval=None, compression=None)
    await ws.send(json.dumps({"thread_id": thread_id, "last_seq": last_seq}))
    return ws


@dataclass
class Got:
    """What one client read: seqs in arrival order, each message's delivery latency, and the
    close it saw."""

    seqs: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ns: list[int] = field(default_factory=list)
    close: tuple[int, str] | None = None

    def take(self, text: str | bytes) -> None:
        message = json.loads(text)
        self.latencies.append(time.perf_counter() - message["at"])
        self.seqs.append(message["seq"])
        self.ns.append(message["n"])


async def read(ws: ClientConnection, last: int, got: Got | None = None, timeout: float = 30) -> Got:
    """Read until seq ``last`` arrived, or the server closed the connection."""
    got = got or Got()
    try:
        while not got.seqs or got.seqs[-1] < last:
            got.take(await asyncio.wait_for(ws.recv(), timeout))
    except ConnectionClosed as closed:
        if closed.rcvd is not None:
            got.close = (closed.rcvd.code, closed.rcvd.reason)
    return got


LOGGERS = ("uvicorn", "")  # uvicorn's own (they do not propagate), and the root


class LogCapture(logging.Handler):
    """Every record at WARNING and above (or with a traceback) of the server's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.stalls: list[float] = []
        """How long the write under way had taken when the hub stopped each reader."""

    def emit(self, record: logging.LogRecord) -> None:
        waited = getattr(record, "emitguard_waited", None)
        if waited is not None and record.levelno >= logging.INFO:
            self.stalls.append(waited)
        if record.levelno >= logging.WARNING or record.exc_info:
            self.records.append(record)

    def __enter__(self) -> LogCapture:
        self._level = logging.getLogger("emitguard").level
        logging.getLogger("emitguard").setLevel(logging.INFO)
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("emitguard").setLevel(self._level)
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self)

    def lines(self) -> list[str]:
        return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in self.records]
