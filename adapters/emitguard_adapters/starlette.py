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
what a reconnecting client missed and stamps every message with its ``seq``.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from emitguard import Guard, Replay, transport

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

__all__ = [
    "CONNECTION",
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
    the connection before leaving, so that no event slips between replay and live."""
    replay = guard.replay(thread_id, after=last_seq)
    if not replay.complete:
        await websocket.send_json(resync_message(thread_id, last_seq, replay))
        return False
    for _, message in replay.messages:
        await websocket.send_json(message)
    return True


def resync_message(thread_id: str, last_seq: int, replay: Replay) -> dict[str, Any]:
    """What a client that missed more than the replay window holds is told (every transport
    sends the same): it must reload the thread's state."""
    return {
        "type": "resync",
        "thread_id": thread_id,
        "last_seq": last_seq,
        "latest_seq": replay.latest,
        "recovered": False,
    }


async def authorized(authorize: Callable[[Any, str], Any], subject: Any, thread_id: str) -> bool:
    """Ask ``authorize(subject, thread_id)`` (sync or async): only ``True`` allows; an
    exception refuses, and is logged."""
    try:
        verdict = authorize(subject, thread_id)
        if inspect.isawaitable(verdict):
            verdict = await verdict
    except Exception:
        log.exception("emitguard: authorize raised for thread %r; refused", thread_id)
        return False
    return verdict is True


def _bad_request(thread_id: object, last_seq: object) -> str | None:
    if not isinstance(thread_id, str) or not thread_id:
        return f"thread_id must be a non-empty string, got {thread_id!r}"
    if last_seq is not None and (
        isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0
    ):
        return f"last_seq must be an int >= 0 or null, got {last_seq!r}"
    return None


def _close_reason(text: str) -> str:
    """A close reason within the WebSocket limit of 123 bytes of UTF-8 (cut with "...")."""
    if len(text.encode("utf-8")) <= 123:
        return text
    cut = text.encode("utf-8")[:120].decode("utf-8", errors="ignore")
    return cut + "..."


Authorize = Callable[["WebSocket", str], "bool | Awaitable[bool]"]


def allow_any(websocket: WebSocket, thread_id: str) -> bool:
    """An ``authorize`` that lets every connection read every thread (demos and tests)."""
    return True


class ThreadHub:
    """A connection manager for new apps: threads, their websockets, replay on reconnect.

    ``ThreadHub(authorize=...)`` builds its own guard (``stamp_seq="seq"``, ``history``
    messages per thread); pass ``guard=`` to use one of yours, built with ``stamp_seq`` and
    ``history``. ``authorize(websocket, thread_id)`` (sync or async) decides who may read a
    thread; there is no default that allows everything (:func:`allow_any` is one, on purpose).
    """

    def __init__(
        self,
        *,
        authorize: Authorize,
        guard: Guard | None = None,
        history: int = 1000,
        **guard_options: Any,
    ) -> None:
        if not callable(authorize):
            raise TypeError(f"authorize must be callable, got {authorize!r}")
        if guard is None:
            guard = Guard(stamp_seq="seq", history=history, name="ThreadHub", **guard_options)
        elif guard_options:
            raise TypeError("pass guard options or a guard, not both")
        if guard.options.stamp_seq is None or not guard.options.history:
            raise ValueError("ThreadHub needs a guard built with stamp_seq= and history=")
        self.guard = guard
        self._authorize = authorize
        self._sockets: dict[str, list[WebSocket]] = {}
        self._threads_of: dict[int, set[str]] = {}

    async def attach(
        self, websocket: WebSocket, thread_id: str, last_seq: int | None = None
    ) -> bool:
        """Attach an accepted websocket to a thread; False (and the socket closed with 1008
        and a reason) when ``authorize`` refuses or the thread id or ``last_seq`` is bad.

        With ``last_seq``, the client first receives, in order, what it missed since then, or
        a ``resync`` message when the window no longer holds it.
        """
        bad = _bad_request(thread_id, last_seq)
        if bad is not None:  # what a client sent: refuse it, do not raise into the endpoint
            await websocket.close(code=1008, reason=_close_reason(bad))
            return False
        if not await authorized(self._authorize, websocket, thread_id):
            reason = _close_reason(f"not allowed to read thread {thread_id}")
            await websocket.close(code=1008, reason=reason)
            return False
        async with self.guard.hold(thread_id):
            if last_seq is not None:
                await replay_to(websocket, self.guard, thread_id, last_seq)
            sockets = self._sockets.setdefault(thread_id, [])
            if not any(known is websocket for known in sockets):  # attaching twice is one
                sockets.append(websocket)
            self._threads_of.setdefault(id(websocket), set()).add(thread_id)
            self.guard.mark_connected(thread_id, owner=self._owner(websocket))
        return True

    async def detach(self, websocket: WebSocket) -> list[str]:
        """Forget a websocket; returns the threads that have no connection left."""
        left: list[str] = []
        for thread_id in sorted(self._threads_of.pop(id(websocket), set())):
            sockets = self._sockets.get(thread_id, [])
            sockets[:] = [known for known in sockets if known is not websocket]
            if not sockets:
                self._sockets.pop(thread_id, None)
                left.append(thread_id)
        self.guard.disconnect_owner(self._owner(websocket), "websocket detached")
        return left

    async def send(self, thread_id: str, message: dict[str, Any]) -> bool:
        """Emit ``message`` (a dict; it gets its ``seq``) to every websocket of the thread,
        through the guard: held while the thread has no connection, replayable afterwards."""
        if not isinstance(message, dict):
            raise TypeError(f"ThreadHub messages are dicts, got {type(message).__name__}")

        async def deliver(stamped: dict[str, Any]) -> bool:
            return await self._deliver(thread_id, stamped)

        return await self.guard.send(thread_id, message, deliver)

    def connections(self, thread_id: str) -> int:
        """How many websockets are attached to the thread."""
        return len(self._sockets.get(thread_id, ()))

    async def _deliver(self, thread_id: str, message: dict[str, Any]) -> bool:
        # Serialised once, outside the per-socket loop: a message that does not serialise
        # raises here (the guard records it FAILED and goes on), and no socket is blamed.
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        delivered = 0
        for websocket in list(self._sockets.get(thread_id, ())):
            try:
                await websocket.send_text(text)
            except Exception as exc:  # that socket is gone; the others may still take it
                log.debug("emitguard hub: send to %r failed: %r", websocket, exc)
                await self.detach(websocket)
            else:
                delivered += 1
        return delivered > 0

    @staticmethod
    def _owner(websocket: WebSocket) -> object:
        return websocket.scope.get(CONNECTION, websocket)
