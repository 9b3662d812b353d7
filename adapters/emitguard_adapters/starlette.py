"""Starlette (and FastAPI): the connection lifecycle and transport-confirmed delivery.

:class:`EmitGuardMiddleware` is pure ASGI and looks at websocket scopes only. Around each
websocket connection it

- tells the guard which connection is being served, so an association made while serving it
  (``update_connection_thread`` in the endpoint) is owned by that connection;
- counts the ``websocket.send`` messages that really leave through the ASGI ``send`` while a
  guarded send runs, so a manager that reports success without sending a frame is caught;
- disconnects the threads the connection carried when it goes (``websocket.disconnect``
  received, ``websocket.close`` sent, or the endpoint returned), unless another live
  connection carries them.

:class:`~emitguard_adapters.hub.ThreadHub` (re-exported here) is a small connection manager
for new apps, built on a guard: it replays what a reconnecting client missed and stamps every
message with its ``seq``. Each of its websockets has its own bounded queue and writer
(:mod:`emitguard_adapters._writer`), so no client can hold a thread's line or stall another.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from emitguard import Guard, transport
from emitguard_adapters._access import THREAD_ID, authorized, resync_message
from emitguard_adapters._writer import STALLED
from emitguard_adapters.hub import ThreadHub, allow_any

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

__all__ = [
    "CONNECTION",
    "STALLED",
    "THREAD_ID",
    "EmitGuardMiddleware",
    "ThreadHub",
    "allow_any",
    "authorized",
    "replay_to",
    "resync_message",
]

log = logging.getLogger("emitguard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONNECTION = "emitguard.connection"
"""Scope key under which the middleware keeps the connection's owner object."""


class _Connection:
    """The owner object of one websocket connection (hashable by identity)."""

    __slots__ = ("client", "closed", "path")

    def __init__(self, scope: Scope) -> None:
        self.path = scope.get("path", "")
        client = scope.get("client")
        self.client = f"{client[0]}:{client[1]}" if client else "?"
        self.closed = False

    def __repr__(self) -> str:
        return f"<websocket {self.path} from {self.client}>"


class EmitGuardMiddleware:
    """``EmitGuardMiddleware(app, guard=guard)``: see the module docstring.

    ``confirm_delivery`` (default True) turns on :meth:`Guard.confirm_deliveries` with
    ``confirm_timeout`` seconds of grace for frames sent by tasks the manager spawns.
    """

    def __init__(
        self,
        app: ASGIApp,
        guard: Guard,
        *,
        confirm_delivery: bool = True,
        confirm_timeout: float = 0.05,
    ) -> None:
        if not isinstance(guard, Guard):
            raise TypeError(f"guard must be an emitguard.Guard, got {guard!r}")
        self.app = app
        self.guard = guard
        if confirm_delivery:
            guard.confirm_deliveries(confirm_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        connection = _Connection(scope)
        scope[CONNECTION] = connection

        async def receive_watched() -> Message:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self._gone(connection, f"client went away (code {message.get('code', 1000)})")
            return message

        frame_sent = transport.frame_sent

        async def send_counted(message: Message) -> None:
            kind = message["type"]
            if kind == "websocket.send":  # the common case first
                await send(message)
                frame_sent(connection)
            elif kind == "websocket.close":
                try:
                    await send(message)
                finally:
                    self._gone(connection, f"server closed it (code {message.get('code', 1000)})")
            else:
                await send(message)

        with transport.serving(connection):
            try:
                await self.app(scope, receive_watched, send_counted)
            finally:
                self._gone(connection, "its endpoint returned")

    def _gone(self, connection: _Connection, why: str) -> None:
        if connection.closed:
            return
        connection.closed = True
        gone = self.guard.disconnect_owner(connection, f"{connection!r}: {why}")
        if gone:
            log.debug("emitguard: %r closed; threads disconnected: %s", connection, gone)


async def replay_to(
    websocket: WebSocket,
    guard: Guard,
    thread_id: str,
    last_seq: int,
    *,
    wire: Callable[[Any], Any] | None = None,
) -> bool:
    """Send a reconnecting client, in order, what it missed of the thread since ``last_seq``
    (from the guard's replay window), or a ``resync`` message when the window no longer holds
    it; True when it got everything. Call it inside ``guard.hold(thread_id)`` and associate
    the connection before leaving, so that no event slips between replay and live (for a
    legacy manager, whose own sends write under the thread's line too; :class:`ThreadHub`
    replays through each connection's writer instead).

    The window holds the messages as they were handed to the guarded send, and each is sent
    with ``websocket.send_json``. When the manager's send wraps a message before it writes it
    (``{"event": ..., "data": ...}``), give the same wrapping as ``wire``: every replayed
    message, the ``resync`` one included, goes out as ``wire(message)``, so a client reads
    replayed and live events alike."""
    encode = wire if wire is not None else _as_is
    replay = guard.replay(thread_id, after=last_seq)
    if not replay.complete:
        await websocket.send_json(encode(resync_message(thread_id, last_seq, replay)))
        return False
    for _, message in replay.messages:
        await websocket.send_json(encode(message))
    return True


def _as_is(message: Any) -> Any:
    return message
