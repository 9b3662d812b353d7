"""Who may read a thread, and what a refused client is told: shared by the hub and the routes.

- :data:`THREAD_ID`, the one definition of a valid thread id (the hub and the SSE and polling
  routes both use it, through their ``thread_pattern`` option);
- :func:`authorized`, which asks an ``authorize`` callback: a synchronous one runs in a worker
  thread (as Starlette runs a sync endpoint), an async one on the loop, both within a timeout;
- :func:`close_reason`, a WebSocket close reason that is always valid UTF-8 of at most 123
  bytes, whatever text it is given;
- :func:`resync_message`, what a client that missed more than the replay window is told;
- :func:`covered`, the seq up to which a reader's replay covered the thread.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from emitguard import Replay

__all__ = [
    "EPOCH",
    "THREAD_ID",
    "authorized",
    "close_reason",
    "covered",
    "resync_message",
    "seconds",
]

log = logging.getLogger("emitguard")

THREAD_ID = r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"
"""What a valid thread id looks like by default (the ``thread_pattern`` option): a letter or
digit, then up to 127 letters, digits and ``._:@-``."""

EPOCH = re.compile(r"[A-Za-z0-9_-]{0,64}")
"""What an epoch in a client's cursor may look like (a shared outbox's epochs are short
tokens; ``""`` is a message stamped before its worker knew the epoch: it resumes by a resync)."""

CLOSE_REASON_BYTES = 123
"""The WebSocket protocol's limit on a close reason (RFC 6455, section 5.5)."""


async def authorized(
    authorize: Callable[[Any, str], Any], subject: Any, thread_id: str, within: float = 5.0
) -> bool:
    """Ask ``authorize(subject, thread_id)``: only ``True`` allows. A coroutine function runs
    on the loop; anything else runs in a worker thread (and may still return an awaitable,
    awaited on the loop). An exception, or no answer ``within`` seconds, refuses and
    is logged (a worker thread that overran is abandoned, not killed)."""
    try:
        with anyio.fail_after(within):
            if _is_async(authorize):
                verdict = await authorize(subject, thread_id)
            else:
                call = functools.partial(authorize, subject, thread_id)
                verdict = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
    except TimeoutError:
        log.warning("emitguard: authorize took over %ss for thread %r; refused", within, thread_id)
        return False
    except Exception:
        log.exception("emitguard: authorize raised for thread %r; refused", thread_id)
        return False
    return verdict is True


def seconds(name: str, value: object) -> float:
    """``value`` as a timeout option called ``name``: a number of seconds > 0, or ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _is_async(func: Callable[..., Any]) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 (an object with an async __call__)
    )


def close_reason(text: str) -> str:
    """``text`` as a close reason: valid UTF-8 of at most 123 bytes (cut with "..."). A lone
    surrogate, which UTF-8 cannot carry, is written as its escape (``\\ud800``)."""
    data = text.encode("utf-8", errors="backslashreplace")
    if len(data) <= CLOSE_REASON_BYTES:
        return data.decode("utf-8")
    return data[: CLOSE_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."


def resync_message(thread_id: str, last_seq: int, replay: Replay) -> dict[str, Any]:
    """What a client that missed more than the replay window holds is told (every transport
    sends the same): it must reload the thread's state."""
    told = {
        "type": "resync",
        "thread_id": thread_id,
        "last_seq": last_seq,
        "latest_seq": replay.latest,
        "recovered": False,
    }
    if replay.epoch is not None:  # a shared log: the epoch the client resumes in from now
        told["epoch"] = replay.epoch
    return told


def covered(replay: Replay | None, last_seq: int | None) -> int:
    """The seq up to which a reader that resumed with ``replay`` has been served: its live
    deliveries up to there are skipped. A delivery of the shared log (Redis) already under way
    in the worker may hand a new reader what it just replayed; in memory the line was held,
    so nothing is skipped but what the client said it had."""
    if replay is None:
        return 0
    if replay.epoch is not None:  # the shared log: the delivery goes on after its latest
        return replay.latest
    if not replay.complete:
        return 0
    return replay.messages[-1][0] if replay.messages else last_seq or 0
