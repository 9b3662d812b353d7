"""Per-connection writers: no reader can hold a thread's line or stall another reader.

Every reader of a thread (a websocket of :class:`~emitguard_adapters.starlette.ThreadHub`, an
SSE stream of :func:`~emitguard_adapters.fallback.emitguard_routes`) reads through its own
:class:`~emitguard.subscriptions.Subscription`: a bounded queue the guard fills without
waiting, closed when it overflows. A writer drains it onto the connection, after what the
client missed, under a :func:`deadline`: a write that does not complete in time closes the
reader's subscriptions at once (the thread stops counting it; nothing more is queued for it),
and the connection is ended after that write (the client then reconnects and resumes from
its last seq, from the replay window). A write is never cancelled half way: ASGI has no way
to abort a connection, so the end reaches a client that stopped reading when it reads again.

:class:`SocketWriter` is the hub's writer of one websocket; the SSE routes let sse-starlette
write and wrap its ``send`` in a :func:`deadline`. :class:`TextCache` lets every reader of a
delivery use one serialisation of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from emitguard.subscriptions import Subscription
from emitguard_adapters._access import close_reason

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

__all__ = ["STALLED", "SendDeadline", "SocketWriter", "TextCache", "deadline"]

log = logging.getLogger("emitguard")

STALLED = 1013
"""The close code of a websocket whose reader fell behind ("try again later"): its client
reconnects and resumes from its last seq."""


@contextlib.contextmanager
def deadline(seconds: float, late: Callable[[], None]) -> Iterator[None]:
    """Call ``late()`` if the body is still running after ``seconds`` (it is not cancelled)."""
    timer = asyncio.get_running_loop().call_later(seconds, late)
    try:
        yield
    finally:
        timer.cancel()


Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]], Send], Awaitable[None]]


class SendDeadline:
    """ASGI wrapper: every message ``app`` sends runs under a :func:`deadline` of ``seconds``
    (``late()`` is called when one overruns; the send itself goes on)."""

    def __init__(self, app: ASGIApp, seconds: float, late: Callable[[], None]) -> None:
        self.app = app
        self.seconds = seconds
        self.late = late

    async def __call__(
        self, scope: Message, receive: Callable[[], Awaitable[Message]], send: Send
    ) -> None:
        async def send_in_time(message: Message) -> None:
            with deadline(self.seconds, self.late):
                await send(message)

        await self.app(scope, receive, send_in_time)


class TextCache:
    """The serialisation of the last ``size`` messages, by identity: the readers of a delivery
    share one (a miss just serialises again)."""

    def __init__(self, encode: Callable[[Any], str], size: int = 1024) -> None:
        self.encode = encode
        self.size = size
        self._texts: dict[int, tuple[Any, str]] = {}

    def text(self, message: Any) -> str:
        known = self._texts.get(id(message))
        if known is not None and known[0] is message:
            return known[1]
        text = self.encode(message)  # may raise: the message cannot be sent to anyone
        if len(self._texts) >= self.size:
            del self._texts[next(iter(self._texts))]  # the oldest
        self._texts[id(message)] = (message, text)  # kept alive, so its id is not reused
        return text


class SocketWriter:
    """Writes one websocket's deliveries: for each thread it reads, what the client missed
    (``backlog``), then the thread's live deliveries, in order; every write within ``timeout``
    seconds. A reader that falls ``maxsize`` behind (its subscription overflows) or whose write
    overruns is closed with :data:`STALLED` and the reason."""

    def __init__(self, websocket: WebSocket, texts: TextCache, timeout: float) -> None:
        self.websocket = websocket
        self.texts = texts
        self.timeout = timeout
        self.reason: str | None = None
        """Why the writer stopped (set once)."""
        self._subscriptions: dict[str, Subscription] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one write at a time on the socket, whichever thread
        self._writing_since: float | None = None

    def __repr__(self) -> str:
        state = f"stopped: {self.reason}" if self.reason else f"{len(self._tasks)} threads"
        return f"<SocketWriter {self.websocket.scope.get('path', '')} ({state})>"

    def reading(self, thread_id: str) -> bool:
        """Whether the websocket still reads the thread."""
        subscription = self._subscriptions.get(thread_id)
        return subscription is not None and not subscription.closed

    def add(
        self, thread_id: str, subscription: Subscription, backlog: list[Any], after: int = 0
    ) -> None:
        """Start writing the thread's ``backlog`` and then its subscription (but seqs up to
        ``after``, which the backlog covered) to the socket."""
        self._subscriptions[thread_id] = subscription
        pump = self._pump(subscription, backlog, after)
        task = asyncio.get_running_loop().create_task(pump)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self, reason: str, level: int = logging.DEBUG) -> None:
        """Close every subscription of the socket (the threads stop counting it)."""
        if self.reason is None:
            self.reason = reason
            since = self._writing_since
            waited = 0.0 if since is None else asyncio.get_running_loop().time() - since
            log.log(
                level,
                "emitguard hub: %r stopped, its write under way for %.3fs: %s",
                self.websocket,
                waited,
                reason,
                extra={"emitguard_waited": waited},
            )
        for subscription in self._subscriptions.values():
            subscription.close(reason)

    async def detach(self, reason: str) -> list[str]:
        """The endpoint is done with the socket: stop writing; returns its threads."""
        self.stop(reason)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return sorted(self._subscriptions)

    async def _pump(self, subscription: Subscription, backlog: list[Any], after: int) -> None:
        try:
            for message in backlog:
                if subscription.closed:
                    break
                await self._write(message)
            async for seq, message in subscription:
                if seq <= after:
                    continue
                await self._write(message)
                if subscription.closed:  # what is left is stale: the client resumes instead
                    break
        except Exception as exc:  # the connection went (or the message cannot be written)
            log.debug("emitguard hub: write to %r failed: %r", self.websocket, exc)
            self.stop(f"write failed: {type(exc).__name__}")
            return
        self.stop(subscription.reason or "closed", logging.INFO)  # fell behind, or ended
        await self._close()

    async def _write(self, message: Any) -> None:
        text = self.texts.text(message)
        async with self._lock:
            if self.reason is not None:
                return
            self._writing_since = asyncio.get_running_loop().time()
            try:
                with deadline(self.timeout, self._late):
                    await self.websocket.send_text(text)
            finally:
                self._writing_since = None
        # Let the loop run between frames: a connection lost meanwhile is noticed before the
        # next write, and a long replay does not keep the other connections waiting.
        await asyncio.sleep(0)

    def _late(self) -> None:
        self.stop(f"a write did not complete within {self.timeout:g}s", logging.INFO)

    async def _close(self) -> None:
        """End the connection with :data:`STALLED` (once; after any write still under way)."""
        async with self._lock:
            websocket = self.websocket
            if websocket.application_state.name != "CONNECTED":
                return
            reason = close_reason(self.reason or "closed")
            log.debug("emitguard hub: closing %r with %d: %s", websocket, STALLED, reason)
            with contextlib.suppress(Exception):  # the client may be gone meanwhile
                await websocket.close(code=STALLED, reason=reason)
