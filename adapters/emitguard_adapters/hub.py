"""ThreadHub: a connection manager for new apps, built on a guard.

Threads, their websockets, a ``seq`` on every message and replay for a client that
reconnects, on one process or, with a shared outbox (``outbox="redis://..."``), on any worker of
the app. Each websocket reads each of its threads through a bounded queue (a
:class:`~emitguard.subscriptions.Subscription`) and a writer task of its own
(:class:`~emitguard_adapters._writer.SocketWriter`): no client can hold a thread's line or
stall another client. See ``docs/starlette.md``.
"""

from __future__ import annotations

import contextlib
import json
import re
import reprlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from emitguard import Guard, Replay
from emitguard_adapters._access import (
    EPOCH,
    THREAD_ID,
    authorized,
    close_reason,
    covered,
    resync_message,
    seconds,
)
from emitguard_adapters._writer import SocketWriter, TextCache

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

__all__ = ["Authorize", "ThreadHub", "allow_any"]

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
        self.send_timeout = seconds("send_timeout", send_timeout)
        self.authorize_timeout = seconds("authorize_timeout", authorize_timeout)
        if guard is None:
            guard_options.setdefault("name", "ThreadHub")
            guard = Guard(stamp_seq="seq", history=history, **guard_options)
        elif guard_options:
            raise TypeError("pass guard options or a guard, not both")
        if guard.options.stamp_seq is None or not guard.options.history:
            raise ValueError("ThreadHub needs a guard built with stamp_seq= and history=")
        self.guard = guard
        self.queue_size = queue_size
        self._authorize = authorize
        self._valid_thread = re.compile(thread_pattern)
        self._texts = TextCache(_encode)
        self._writers: dict[int, SocketWriter] = {}
        self._readers: dict[str, list[SocketWriter]] = {}

    async def attach(
        self, websocket: WebSocket, thread_id: Any, last_seq: Any = None, epoch: Any = None
    ) -> bool:
        """Attach an accepted websocket to a thread; False (and the socket closed with 1008
        and a reason) when ``authorize`` refuses or the thread id, ``last_seq`` or ``epoch``
        is bad, and False when the client has already left.

        With ``last_seq``, the client first receives, in order, what it missed since then, or
        a ``resync`` message when the window no longer holds it; then the thread's live
        messages. With a shared outbox (Redis) the cursor is ``(epoch, last_seq)``: the
        ``epoch`` of the last message the client saw (every message carries it); a cursor of
        another epoch (the history was lost) gets the resync. Nothing is written here: the
        socket's writer does it.
        """
        bad = self._bad_request(thread_id, last_seq, epoch)
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
            backlog, replayed = await self._backlog(thread_id, last_seq, epoch)
            subscription = self.guard.subscribe(thread_id, maxsize=self.queue_size)
            subscription.epoch = replayed.epoch if replayed is not None else None
        writer.add(thread_id, subscription, backlog, covered(replayed, last_seq))
        readers = self._readers.setdefault(thread_id, [])
        if writer not in readers:
            readers.append(writer)
        return True

    async def serve(self, websocket: WebSocket) -> None:
        """Serve an accepted websocket the hub's way, until it goes: its first message is the
        hello, JSON ``{"thread_id": ..., "last_seq": <int> or null}``; then it reads the
        thread (with a shared outbox, also ``"epoch"``: the one of the message whose seq is
        ``last_seq``). A hello that is not that is refused with 1008; later messages are
        ignored.
        Nothing a client sends or does makes this raise."""
        try:
            hello = _hello(await websocket.receive())
            if hello is None:
                return  # gone before saying hello
            if isinstance(hello, str):
                await _refuse(websocket, hello)
            elif await self.attach(websocket, *hello):
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass
        finally:
            await self.detach(websocket)

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

    async def _backlog(
        self, thread_id: str, last_seq: int | None, epoch: str | None
    ) -> tuple[list[Any], Replay | None]:
        if last_seq is None:
            return [], None
        replay = await self.guard.areplay(thread_id, after=last_seq, epoch=epoch)
        if not replay.complete:
            return [resync_message(thread_id, last_seq, replay)], replay
        return [message for _, message in replay.messages], replay

    def _bad_request(self, thread_id: object, last_seq: object, epoch: object) -> str | None:
        if not isinstance(thread_id, str) or not thread_id:
            return f"thread_id must be a non-empty string, got {reprlib.repr(thread_id)}"
        if not self._valid_thread.fullmatch(thread_id):
            return "thread_id is not a valid thread id"
        if last_seq is not None and (
            isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0
        ):
            return f"last_seq must be an int >= 0 or null, got {reprlib.repr(last_seq)}"
        if epoch is not None and not (isinstance(epoch, str) and EPOCH.fullmatch(epoch)):
            return f"epoch must be a short string or null, got {reprlib.repr(epoch)}"
        return None


HELLO = 'the first message must be JSON {"thread_id": ..., "last_seq": ...}'


def _hello(message: MutableMapping[str, Any]) -> tuple[Any, Any, Any] | str | None:
    """The thread id, last seq and epoch a hello names (:meth:`ThreadHub.attach` checks them), why
    it is no hello, or None when the client left instead."""
    if message["type"] == "websocket.disconnect":
        return None
    try:
        hello = json.loads(message.get("text") or "")
    except ValueError:
        hello = None
    if not isinstance(hello, dict):
        return HELLO
    return hello.get("thread_id"), hello.get("last_seq"), hello.get("epoch")


def _open(websocket: WebSocket) -> bool:
    return websocket.client_state.name == websocket.application_state.name == "CONNECTED"


async def _refuse(websocket: WebSocket, why: str) -> bool:
    """Close the websocket with 1008 and ``why``; False (also when the client already left)."""
    if websocket.application_state.name == "CONNECTED":
        with contextlib.suppress(Exception):  # gone meanwhile: nobody to tell
            await websocket.close(code=1008, reason=close_reason(why))
    return False
