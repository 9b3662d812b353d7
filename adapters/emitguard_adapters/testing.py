"""Real-socket test parts: a legacy manager over Starlette websockets, its app, and a server.

``LegacyWebSocketManager`` behaves like the manager of the incident report, on real
connections: the agent's first emit can run before ``update_connection_thread``, and then
``Cannot deliver message for thread ... no connections`` is logged and the event is lost.
``serve(app)`` runs an ASGI app under uvicorn in the running loop, on a loopback socket it binds
first (so parallel tests cannot race for the port).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

__all__ = ["LegacyWebSocketManager", "bound_socket", "legacy_app", "serve"]

log = logging.getLogger("emitguard.testing.legacy")


class LegacyWebSocketManager:
    """The report's connection manager on real websockets (the code emitguard guards)."""

    def __init__(self, *, testing: bool = False) -> None:
        self.testing = testing
        """The report's TESTING shortcut: ``send_to_thread`` returns True and sends nothing."""
        self._sockets: dict[str, tuple[str, WebSocket]] = {}
        self._thread_of: dict[str, str] = {}
        self._ids = itertools.count(1)
        self.lost = 0

    def connect(self, websocket: WebSocket, user_id: str) -> str:
        connection_id = f"conn-{next(self._ids)}"
        self._sockets[connection_id] = (user_id, websocket)
        return connection_id

    def disconnect(self, connection_id: str) -> None:
        self._sockets.pop(connection_id, None)
        self._thread_of.pop(connection_id, None)

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        found = [cid for cid, (user, _) in self._sockets.items() if user == user_id]
        if not found:
            log.warning("No WebSocket connections found for user %s", user_id)
            return False
        for connection_id in found:
            self._thread_of[connection_id] = thread_id
        return True

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        if self.testing:
            return True
        targets = [cid for cid, thread in self._thread_of.items() if thread == thread_id]
        if not targets:
            log.warning(
                "Cannot deliver message for thread %s - no connections (active connections: %d)",
                thread_id,
                len(self._sockets),
            )
            self.lost += 1
            return False
        delivered = 0
        for connection_id in targets:
            _, websocket = self._sockets[connection_id]
            try:
                await websocket.send_json(message)
            except Exception as exc:  # the connection is gone
                log.warning("Send to %s failed: %r", connection_id, exc)
                self.disconnect(connection_id)
            else:
                delivered += 1
        if not delivered:
            self.lost += 1
        return delivered > 0


Agent = Callable[[LegacyWebSocketManager, str, dict[str, Any]], Coroutine[Any, Any, None]]


async def count_agent(
    manager: LegacyWebSocketManager, thread_id: str, start: dict[str, Any]
) -> None:
    """Emit ``start["events"]`` numbered events to the thread, ``start["gap"]`` seconds apart."""
    for n in range(int(start.get("events", 5))):
        await manager.send_to_thread(thread_id, {"type": "agent_update", "n": n})
        await asyncio.sleep(float(start.get("gap", 0.0)))
    await manager.send_to_thread(thread_id, {"type": "agent_completed"})


def legacy_app(
    manager: LegacyWebSocketManager, *, lag: float = 0.02, agent: Agent = count_agent
) -> Starlette:
    """A ``/ws`` endpoint as in the report: the client's first message names its user and
    thread and starts an agent run; the association follows ``lag`` seconds later (the agent
    does not wait for it). Later messages start more runs on the same thread."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        first = await websocket.receive_json()
        user_id, thread_id = str(first["user_id"]), str(first["thread_id"])
        connection_id = manager.connect(websocket, user_id)
        runs = {asyncio.create_task(agent(manager, thread_id, first))}
        try:
            await asyncio.sleep(lag)
            manager.update_connection_thread(user_id, thread_id)
            while True:
                runs.add(
                    asyncio.create_task(agent(manager, thread_id, await websocket.receive_json()))
                )
        except WebSocketDisconnect:
            pass
        finally:
            manager.disconnect(connection_id)

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to a port the system picked (port 0), not listening yet: the port is
    held from this moment on, so no other server can take it before this one listens.

    It is made with ``IPPROTO_TCP`` named, as ``loop.create_server(host, port)`` makes its
    own: asyncio turns Nagle's algorithm off (``TCP_NODELAY``) only on sockets whose protocol
    says TCP, so a socket made with protocol 0 would serve every connection with Nagle on,
    and small frames would wait for the peer's delayed ACKs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


_live: list[uvicorn.Server] = []
"""The servers :func:`serve` runs in the main thread, oldest first."""
_before: dict[int, Any] = {}
"""The signal handlers the process had before the first of them."""


class _Server(uvicorn.Server):
    """uvicorn's server, whose signal handlers stay right when servers overlap.

    Each ``uvicorn.Server`` points SIGINT and SIGTERM at its own ``handle_exit`` while it
    runs and puts back what it found when it ends. Two servers that overlap and end in the
    order they started leave the first one's handler installed for good: Ctrl+C then goes to
    a server that has exited instead of interrupting the process, and code that finds "the
    server" through that handler (sse-starlette does) sees one that is shutting down. Here
    the handler is always the newest live server's, and the process's own again when the
    last one ends.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if not _live:
            _before.update({sig: signal.getsignal(sig) for sig in _SIGNALS})
        _live.append(self)
        _point_signals()
        try:
            yield
        finally:
            _live.remove(self)
            _point_signals()
        for captured in reversed(self._captured_signals):  # as uvicorn does: a signal this
            signal.raise_signal(captured)  # server took for its shutdown goes on to the next


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _point_signals() -> None:
    for sig in _SIGNALS:
        signal.signal(sig, _live[-1].handle_exit if _live else _before[sig])


@contextlib.asynccontextmanager
async def serve(app: Any, **options: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in the running loop; yields ``host:port``.

    The socket is bound first and handed to uvicorn (``Server.serve(sockets=[...])``), and the
    address is the one it is bound to: parallel tests cannot race for a port. ``options`` go
    to ``uvicorn.Config`` (``ws_ping_interval=None`` for a test whose clients stop reading for
    longer than uvicorn's keepalive allows: it would close them with 1011).
    """
    sock = bound_socket()
    host, port = sock.getsockname()[:2]
    options.setdefault("log_level", "warning")
    options.setdefault("lifespan", "off")
    config = uvicorn.Config(app, **options)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.005)
        yield f"{host}:{port}"
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()
