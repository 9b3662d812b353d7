"""Real python-socketio servers and clients on loopback for the socketio adapter's tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import socketio

from emitguard_adapters.testing import serve


@contextlib.asynccontextmanager
async def running(sio: socketio.AsyncServer) -> AsyncIterator[str]:
    """Serve ``sio`` (its ASGI app under uvicorn); yields ``http://host:port``."""
    async with serve(socketio.ASGIApp(sio)) as address:
        yield f"http://{address}"


def client(**options: Any) -> socketio.AsyncClient:
    """An AsyncClient that reconnects at once (tests abort transports on purpose)."""
    options.setdefault("reconnection_delay", 0.05)
    options.setdefault("reconnection_delay_max", 0.1)
    options.setdefault("randomization_factor", 0.0)
    return socketio.AsyncClient(**options)


def abort(sio_client: socketio.AsyncClient) -> None:
    """Kill the client's transport as a crashed network would (no close frame)."""
    sio_client.eio.ws._response.connection.transport.abort()


async def until(predicate: Any, timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` is true, or fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {predicate}")
