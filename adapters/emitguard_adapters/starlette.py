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

:class:`ThreadHub` is a small connection manager for new apps, built on a guard: it replays
what a reconnecting client missed and stamps every message with its ``seq``. Each of its
websockets has its own bounded queue and writer (:mod:`emitguard_adapters._writer`), so no
client can hold a thread's line or stall another client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import reprlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from emitguard import Guard, transport
from emitguard_adapters._access import (
    THREAD_ID,
    authorized,
    close_reason,
    resync_message,
    seconds,
)
from emitguard_adapters._writer import STALLED, SocketWriter, TextCache

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


async def replay_to(websocket: WebSocket, guard: Guard, thread_id: str, last_seq: int) -> bool:
    """Send a reconnecting client, in order, what it missed of the thread since ``last_seq``
    (from the guard's replay window), or a ``resync`` message when the window no longer holds
    it; True when it got everything. Call it inside ``guard.hold(thread_id)`` and associate
    the connection before leaving, so that no event slips between replay and live (for a
    legacy manager, whose own sends write under the thread's line too; :class:`ThreadHub`
    replays through each connection's writer instead)."""
    replay = guard.replay(thread_id, after=last_seq)
    if not replay.complete:
        await websocket.send_json(resync_message(thread_id, last_seq, replay))
        return False
    for _, message in replay.messages:
        await websocket.send_json(message)
    return True


Authorize = Callable[["WebSocket", str], "bool | Awaitable[bool]"]


def allow_any(websocket: WebSocket, thread_id: str) -> bool:
    """An ``authorize`` that lets every connection read every thread (demos and tests)."""
    return True


def _encode(message: Any) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


class ThreadHub:
    """A connection manager for new apps: threads, their websockets, replay on reconnect.

    ``ThreadHub(authorize=...)`` builds its own guard (``stamp_seq="seq"``, ``history``
    messages per thread); pass ``guard=`` to use one of yours, built with ``stamp_seq`` and
    ``history``. ``authorize(websocket, thread_id)`` (sync or async) decides who may read a
    thread; there is no default that allows everything (:func:`allow_any` is one, on purpose).
    A sync ``authorize`` runs in a worker thread; either kind has ``authorize_timeout``
    seconds to answer.

    Each attached websocket reads each of its threads through a queue of ``queue_size``
    deliveries and a writer task of its own (:mod:`emitguard_adapters._writer`): a send puts
    the message on every reader's queue and returns. A reader that falls ``queue_size``
    behind, or whose write takes over ``send_timeout`` seconds, is closed with code 1013;
    its client reconnects with its last seq and loses nothing.
    """

    def __init__(
        self,
        *,
        authorize: Authorize,
        guard: Guard | None = None,
        history: int = 1000,
        queue_size: int = 1000,
        send_timeout: float = 10.0,
        authorize_timeout: float = 5.0,
        thread_pattern: str = THREAD_ID,
        **guard_options: Any,
    ) -> None:
        if not callable(authorize):
            raise TypeError(f"authorize must be callable, got {authorize!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if guard is None:
            guard = Guard(stamp_seq="seq", history=history, name="ThreadHub", **guard_options)
        elif guard_options:
            raise TypeError("pass guard options or a guard, not both")
        if guard.options.stamp_seq is None or not guard.options.history:
            raise ValueError("ThreadHub needs a guard built with stamp_seq= and history=")
        self.guard = guard
        self.queue_size = queue_size
        self.send_timeout = seconds("send_timeout", send_timeout)
        self.authorize_timeout = seconds("authorize_timeout", authorize_timeout)
        self._authorize = authorize
        self._valid_thread = re.compile(thread_pattern)
        self._texts = TextCache(_encode)
        self._writers: dict[int, SocketWriter] = {}
        self._readers: dict[str, list[SocketWriter]] = {}

    async def attach(self, websocket: WebSocket, thread_id: Any, last_seq: Any = None) -> bool:
        """Attach an accepted websocket to a thread; False (and the socket closed with 1008
        and a reason) when ``authorize`` refuses or the thread id or ``last_seq`` is bad, and
        False when the client has already left.

        With ``last_seq``, the client first receives, in order, what it missed since then, or
        a ``resync`` message when the window no longer holds it; then the thread's live
        messages. Nothing is written here: the socket's writer does it.
        """
        bad = self._bad_request(thread_id, last_seq)
        if bad is not None:  # what a client sent: refuse it, do not raise into the endpoint
            return await _refuse(websocket, bad)
        allowed = await authorized(self._authorize, websocket, thread_id, self.authorize_timeout)
        if not allowed:
            return await _refuse(websocket, f"not allowed to read thread {thread_id}")
        writer = self._writers.get(id(websocket))
        if writer is None:
            writer = self._writers[id(websocket)] = SocketWriter(
                websocket, self._texts, self.send_timeout
            )
        if writer.reason is not None or not _open(websocket):
            return False  # stopped by the hub, or the client left
        if writer.reading(thread_id):
            return True  # attaching twice is one
        async with self.guard.hold(thread_id):  # no delivery between the replay and live
            backlog = self._backlog(thread_id, last_seq)
            subscription = self.guard.subscribe(thread_id, maxsize=self.queue_size)
        writer.add(thread_id, subscription, backlog)
        readers = self._readers.setdefault(thread_id, [])
        if writer not in readers:
            readers.append(writer)
        return True

    async def detach(self, websocket: WebSocket) -> list[str]:
        """Forget a websocket; returns the threads that have no connection left."""
        writer = self._writers.pop(id(websocket), None)
        if writer is None:
            return []
        left: list[str] = []
        for thread_id in await writer.detach("websocket detached"):
            readers = self._readers.get(thread_id, [])
            readers[:] = [known for known in readers if known is not writer]
            if not self.connections(thread_id):
                self._readers.pop(thread_id, None)
                left.append(thread_id)
        return left

    async def send(self, thread_id: str, message: dict[str, Any]) -> bool:
        """Emit ``message`` (a dict; it gets its ``seq``) to every websocket of the thread,
        through the guard: put on each reader's queue, held while the thread has no reader,
        replayable afterwards. It never waits for a network write."""
        if not isinstance(message, dict):
            raise TypeError(f"ThreadHub messages are dicts, got {type(message).__name__}")
        return await self.guard.send(thread_id, message, self._serialise)

    def connections(self, thread_id: str) -> int:
        """How many websockets read the thread (a stopped reader no longer counts)."""
        return sum(1 for writer in self._readers.get(thread_id, ()) if writer.reading(thread_id))

    async def _serialise(self, message: dict[str, Any]) -> bool:
        # The guard hands the stamped message to every reader's queue (a subscription) after
        # this returns. Serialised once, here: a message that does not serialise raises (the
        # guard records it FAILED and goes on), and no reader is blamed for it.
        self._texts.text(message)
        return False  # no socket written here: the readers' queues count as the delivery

    def _backlog(self, thread_id: str, last_seq: int | None) -> list[Any]:
        if last_seq is None:
            return []
        replay = self.guard.replay(thread_id, after=last_seq)
        if not replay.complete:
            return [resync_message(thread_id, last_seq, replay)]
        return [message for _, message in replay.messages]

    def _bad_request(self, thread_id: object, last_seq: object) -> str | None:
        if not isinstance(thread_id, str) or not thread_id:
            return f"thread_id must be a non-empty string, got {reprlib.repr(thread_id)}"
        if not self._valid_thread.fullmatch(thread_id):
            return "thread_id is not a valid thread id"
        if last_seq is not None and (
            isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0
        ):
            return f"last_seq must be an int >= 0 or null, got {reprlib.repr(last_seq)}"
        return None


def _open(websocket: WebSocket) -> bool:
    return websocket.client_state.name == websocket.application_state.name == "CONNECTED"


async def _refuse(websocket: WebSocket, why: str) -> bool:
    """Close the websocket with 1008 and ``why``; False (also when the client already left)."""
    if websocket.application_state.name == "CONNECTED":
        with contextlib.suppress(Exception):  # gone meanwhile: nobody to tell
            await websocket.close(code=1008, reason=close_reason(why))
    return False
