"""Sends while telemetry or transport confirmation is active (the guard is *instrumented*).

The plain hot path (``_hotpath``) makes no record, no span and no frame probe, so an
instrumented guard routes every send here instead. A send to a CONNECTED, idle thread still
takes a short path (no record: the delivery is counted from its seq, as on the hot path);
every other send runs the general path under its span, which learns the outcome from the
record the send concludes with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from emitguard import transport
from emitguard._core import CONNECTED, thread_name
from emitguard._flow import UNCONFIRMED
from emitguard._line import ThreadSlot
from emitguard._telemetry import SEND
from emitguard.calls import MISSING, Call, Rebind, Verdict, judge, judge_error
from emitguard.records import event_type_of
from emitguard.transport import PROBE, Probe

if TYPE_CHECKING:
    from emitguard.guard import Guard


async def traced_send(
    guard: Guard,
    thread_id: Any,
    message: Any,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rebind: Rebind,
) -> bool:
    """:meth:`Guard.send_call` when instrumented: a span per emission, outcomes counted,
    deliveries confirmed by the transport.

    A send to a CONNECTED thread with nothing queued is delivered here, like the hot path
    does it, and gets its span when the delivery returns, started at the time of the call
    and carrying every attribute from the start: no context switch around the call and no
    second attribute write (about 1.5 us of a span's 20; ``docs/performance.md``). Every
    other send runs the general path under an open span, which learns the outcome from the
    record the send concludes with.
    """
    tel = guard._tel
    slot = guard._threads.get(thread_id) if isinstance(thread_id, str) else None
    if (
        slot is None
        or slot.state is not CONNECTED
        or slot.busy
        or slot.backlog
        or message is None
        or message is MISSING
        or not guard._plain
    ):
        return await _send_general(guard, thread_id, message, Call(fn, args, kwargs, rebind))
    started = time.time_ns() if tel.active else 0
    slot.busy = True
    slot.seq = seq = slot.seq + 1
    probe = token = None
    if guard._confirm is not None:  # (transport.open_probe, inlined: this path is hot)
        probe = Probe()
        token = PROBE.set(probe)
    verdict = error = why = None  # verdict None: delivered
    try:
        try:
            result = await fn(*args, **kwargs)
        finally:
            if token is not None:
                transport.close_probe(token)
        if not result and result is not None:
            verdict, why = judge(result)
        elif (
            probe is not None
            and not probe.frames
            and not await probe.wait(guard._confirm or 0.0, slot.owners)
        ):
            verdict, why = Verdict.RETRY, UNCONFIRMED
    except asyncio.CancelledError:  # during the send or its confirmation: keep the event
        call = Call(fn, args, kwargs, rebind)
        await _failed(
            guard, slot, seq, message, call, started, Verdict.RETRY, "cancelled", None, True
        )
        raise
    except Exception as exc:
        verdict, why = judge_error(exc, guard._poison)
        error = exc
    if verdict is not None:
        call = Call(fn, args, kwargs, rebind)
        return await _failed(guard, slot, seq, message, call, started, verdict, why or "", error)
    if probe is not None and not probe.owners <= slot.owners:  # a new carrier connection
        guard._adopt(slot, probe)
    if slot.queue or slot.backlog:
        guard._leave(slot)
    else:
        slot.busy = False
    if tel.active:  # (off when only transport confirmation brought the send here)
        event_type = event_type_of(message)
        tel.delivered(event_type)
        span = tel.start(SEND, slot.thread_id, seq, event_type, start_time=started, delivered=True)
        if span is not None:
            tel.hook(span, slot.thread_id, message)
            span.end()
    return True


async def _send_general(guard: Guard, thread_id: Any, message: Any, call: Call) -> bool:
    with guard._tel.sending(thread_name(thread_id), message):
        return await guard._send_guarded(thread_id, message, call)


async def _failed(
    guard: Guard,
    slot: ThreadSlot,
    seq: int,
    message: Any,
    call: Call,
    started: int,
    verdict: Verdict,
    why: str,
    error: Exception | None,
    cancelled: bool = False,
) -> bool:
    """A traced fast-path delivery failed (or its sender was cancelled): open its span and
    let the outbox take over under it."""
    with guard._tel.sending(slot.thread_id, message, seq, started or None, error):
        return await guard._failed_fast(slot, seq, message, call, verdict, why, cancelled)


def traced_send_sync(guard: Guard, thread_id: Any, message: Any, call: Call) -> bool:
    """:meth:`Guard.send_sync_call` with telemetry."""
    with guard._tel.sending(thread_name(thread_id), message):
        return guard._send_sync_guarded(thread_id, message, call)
