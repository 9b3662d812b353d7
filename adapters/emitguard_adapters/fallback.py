"""Fallback transports for clients that cannot keep a WebSocket: SSE and polling.

``emitguard_routes(guard, authorize=...)`` returns two Starlette routes on the guard's seq
space (the same ``seq`` a WebSocket client of :class:`~emitguard_adapters.starlette.ThreadHub`
sees):

- ``GET {prefix}/threads/{thread_id}/events``: a Server-Sent Events stream (framed by
  sse-starlette). Each event has ``id: <seq>``, ``event: <event type>`` and the message as
  JSON data. It resumes after the ``Last-Event-ID`` header (what a browser's ``EventSource``
  sends when it reconnects) or a ``last_event_id`` query parameter, and sends a ``resync``
  event when the guard's replay window no longer covers the gap. With a shared outbox (Redis)
  the id is ``<epoch>:<seq>``, the stream resumes on any worker of the app, and an id of
  another epoch (the history was lost) gets the ``resync`` event. The stream is a subscription
  of the thread (:meth:`emitguard.Guard.subscribe`): it counts as a connection, so events are
  delivered to it rather than buffered.
- ``GET {prefix}/threads/{thread_id}/messages?after=<seq>&limit=<n>``: a JSON page of what
  the client missed, with the cursor of the next page (``next_after``; with a shared outbox
  also ``epoch`` and ``cursor``, ``<epoch>:<seq>``, which ``after`` takes as well).

``authorize(request, thread_id)`` (sync or async) is required and must return True; a refusal
is a 403 with no data. A thread id that is not a valid id, and a bad cursor, are a 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emitguard import Guard
from emitguard.records import event_type_of
from emitguard_adapters._access import (
    EPOCH,
    THREAD_ID,
    authorized,
    covered,
    resync_message,
    seconds,
)
from emitguard_adapters._writer import SendDeadline, TextCache

__all__ = ["THREAD_ID", "emitguard_routes"]

log = logging.getLogger("emitguard")

Authorize = Callable[[Request, str], "bool | Awaitable[bool]"]
_NO_STORE = {"Cache-Control": "no-store"}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def emitguard_routes(
    guard: Guard,
    *,
    authorize: Authorize,
    prefix: str = "/emitguard",
    ping: float = 15.0,
    retry_ms: int = 1000,
    page_limit: int = 100,
    max_page_limit: int = 1000,
    thread_pattern: str = THREAD_ID,
    queue_size: int = 1000,
    send_timeout: float = 10.0,
    authorize_timeout: float = 5.0,
) -> list[Route]:
    """The SSE and polling routes (see the module docstring). ``ping``: seconds between
    keep-alive comments; ``retry_ms``: the reconnection delay the stream asks browsers for;
    ``queue_size``: deliveries a slow stream may lag behind, and ``send_timeout``: seconds one
    write to it may take, before it is closed (the client then reconnects and resumes);
    ``authorize_timeout``: seconds ``authorize`` has to answer (a sync one runs in a worker
    thread)."""
    if not isinstance(guard, Guard):
        raise TypeError(f"guard must be an emitguard.Guard, got {guard!r}")
    if not callable(authorize):
        raise TypeError(
            f"authorize must be callable (there is no allow-all default), got {authorize!r}"
        )
    if not guard.options.history:
        raise ValueError("emitguard_routes needs a guard with a replay window: history=N")
    if not 1 <= page_limit <= max_page_limit:
        raise ValueError(f"page_limit must be from 1 to max_page_limit, got {page_limit!r}")
    send_timeout = seconds("send_timeout", send_timeout)
    authorize_timeout = seconds("authorize_timeout", authorize_timeout)
    texts = TextCache(_encode)
    valid_thread = re.compile(thread_pattern)
    base = prefix.rstrip("/")

    async def checked(request: Request) -> str:
        thread_id = str(request.path_params["thread_id"])
        if not valid_thread.fullmatch(thread_id):
            raise _Refused(400, "not a valid thread id")
        if not await authorized(authorize, request, thread_id, authorize_timeout):
            raise _Refused(403, "not allowed to read this thread")
        return thread_id

    async def events(request: Request) -> Response | SendDeadline:
        try:
            thread_id = await checked(request)
            if request.method == "HEAD":  # no body: do not open a subscription for nobody
                return Response(media_type="text/event-stream", headers=_NO_STORE)
            given = request.headers.get("last-event-id") or request.query_params.get(
                "last_event_id"
            )
            epoch, last = _position(given, "Last-Event-ID") if given else (None, None)
        except _Refused as refused:
            return _error(refused)
        async with guard.hold(thread_id):  # nothing of the thread is delivered meanwhile
            replay = None
            if last is not None:
                replay = await guard.areplay(thread_id, after=last, epoch=epoch)
            subscription = guard.subscribe(thread_id, maxsize=queue_size)
            subscription.epoch = replay.epoch if replay is not None else None
        skip = covered(replay, last)

        shutdown = anyio.Event()  # set by sse-starlette when the server shuts down

        async def end_on_shutdown() -> None:
            await shutdown.wait()
            subscription.close("server shutting down")

        def late() -> None:  # the stream ends after that write: see _writer
            if not subscription.closed:
                log.info(
                    "emitguard sse: a write to a stream of thread %r took over %gs; closed",
                    thread_id,
                    send_timeout,
                    extra={"emitguard_waited": send_timeout},
                )
            subscription.close(f"a write did not complete within {send_timeout:g}s")

        async def stream() -> AsyncIterator[ServerSentEvent]:
            watcher = asyncio.ensure_future(end_on_shutdown())
            try:
                yield ServerSentEvent(comment="emitguard", retry=retry_ms)
                if replay is not None and not replay.complete:
                    notice = resync_message(thread_id, last or 0, replay)
                    yield ServerSentEvent(json.dumps(notice), event="resync")
                elif replay is not None:
                    for seq, message in replay.messages:
                        if subscription.closed:
                            return
                        yield _event(seq, message, texts, replay.epoch)
                async for seq, message in subscription:
                    if subscription.closed:  # fell behind or a write overran: end, resume
                        return
                    if seq > skip:
                        yield _event(seq, message, texts, subscription.epoch)
            finally:
                watcher.cancel()
                subscription.close("stream ended")

        response = EventSourceResponse(
            stream(),
            ping=ping,
            shutdown_event=shutdown,
            shutdown_grace_period=1.0,  # the stream ends itself: a clean end of the body
            headers={**_NO_STORE, "X-Accel-Buffering": "no"},
            background=BackgroundTask(subscription.close, "response finished"),
        )
        return SendDeadline(response, send_timeout, late)

    async def messages(request: Request) -> Response:
        try:
            thread_id = await checked(request)
            epoch, after = _position(request.query_params.get("after", "0"), "after")
            limit = _cursor(request.query_params.get("limit", str(page_limit)), "limit")
            if not 1 <= limit <= max_page_limit:
                raise _Refused(400, f"limit must be from 1 to {max_page_limit}")
        except _Refused as refused:
            return _error(refused)
        replay = await guard.areplay(thread_id, after=after, epoch=epoch)
        if not replay.complete:
            body = {
                **resync_message(thread_id, after, replay),
                "messages": [],
                "next_after": replay.latest,
                "more": False,
            }
            return JSONResponse(_with_cursor(body, replay.epoch), headers=_NO_STORE)
        page = replay.messages[:limit]
        body = {
            "type": "page",
            "thread_id": thread_id,
            "messages": [{"seq": seq, "event": _kind(m), "data": m} for seq, m in page],
            "next_after": page[-1][0] if page else after,
            "more": len(replay.messages) > limit,
            "latest_seq": replay.latest,
            "recovered": True,
        }
        return JSONResponse(_with_cursor(body, replay.epoch), headers=_NO_STORE)

    return [
        Route(f"{base}/threads/{{thread_id}}/events", events, methods=["GET"]),
        Route(f"{base}/threads/{{thread_id}}/messages", messages, methods=["GET"]),
    ]


def _cursor(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise _Refused(400, f"{what} must be a whole number >= 0")
    return int(text)


def _position(text: str, what: str) -> tuple[str | None, int]:
    """A client's cursor: ``<seq>``, or ``<epoch>:<seq>`` (what a shared outbox hands out)."""
    epoch, colon, seq = text.rpartition(":")
    if colon and not EPOCH.fullmatch(epoch):
        raise _Refused(400, f"{what} must be <seq> or <epoch>:<seq>")
    return (epoch if colon else None), _cursor(seq, what)


def _with_cursor(body: dict[str, Any], epoch: str | None) -> dict[str, Any]:
    """A page with a shared outbox's epoch and the cursor of the next one."""
    if epoch is not None:
        body["epoch"] = epoch
        body["cursor"] = f"{epoch}:{body['next_after']}"
    return body


def _kind(message: Any) -> str:
    return event_type_of(message) or "message"


def _encode(message: Any) -> str:
    return json.dumps(message, default=str)


def _event(seq: int, message: Any, texts: TextCache, epoch: str | None) -> ServerSentEvent:
    ident = str(seq) if epoch is None else f"{epoch}:{seq}"
    return ServerSentEvent(texts.text(message), id=ident, event=_kind(message))


def _error(refused: _Refused) -> Response:
    return JSONResponse({"error": str(refused)}, status_code=refused.status)
