"""Sends while telemetry is active: each one under a span of its own.

The plain hot path (``_hotpath``) makes no record and no span, so an active guard routes every
send here instead. A send to a CONNECTED, idle thread still takes a short path (no record, the
delivery counted from its seq like the hot path's); every other send runs the general path
under its span, which learns the outcome from the record the send concludes with.
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
from emitguard._telemetry import SEND, Scope
from emitguard.calls import MISSING, Call, Rebind, Verdict, judge, judge_error
from emitguard.errors import EmissionError
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
    """:meth:`Guard.send_call` with telemetry: a span per emission, outcomes counted.

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
    confirmed = True
    try:
        try:
            result = await fn(*args, **kwargs)
        finally:
            if token is not None:
                transport.close_probe(token)
        if probe is not None and (result or result is None) and not probe.frames:
            confirmed = await probe.wait(guard._confirm or 0.0, slot.owners)
    except asyncio.CancelledError:  # during the send or its confirmation: keep the event
        call = Call(fn, args, kwargs, rebind)
        await _failed(
            guard, slot, seq, message, call, started, Verdict.RETRY, "cancelled", None, True
        )
        raise
    except Exception as exc:
        verdict, why = judge_error(exc, guard._poison)
        call = Call(fn, args, kwargs, rebind)
        return await _failed(guard, slot, seq, message, call, started, verdict, why, exc)
    if not confirmed:
        call = Call(fn, args, kwargs, rebind)
        return await _failed(
            guard, slot, seq, message, call, started, Verdict.RETRY, UNCONFIRMED, None
        )
    if probe is not None and not probe.owners <= slot.owners:  # a new carrier connection
        for owner in probe.owners - slot.owners:
            guard._own(slot, owner)
    if not result and result is not None:
        verdict, reason = judge(result)
        call = Call(fn, args, kwargs, rebind)
        return await _failed(guard, slot, seq, message, call, started, verdict, reason or "", None)
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
    tel = guard._tel
    name = thread_name(thread_id)
    scope = Scope(tel.start(SEND, name, 0, event_type_of(message)))
    tel.hook(scope.span, name, message)
    try:
        with scope:
            try:
                return await guard._send_slow(thread_id, message, call)
            except EmissionError:
                raise
            except Exception as exc:
                return guard._fault(thread_id, message, exc)
    finally:
        tel.finish_send(scope)


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
    """A traced fast-path delivery failed (or was cancelled): open its span and let the
    outbox take over under it."""
    tel = guard._tel
    event_type = event_type_of(message)
    scope = Scope(tel.start(SEND, slot.thread_id, seq, event_type, start_time=started or None))
    tel.hook(scope.span, slot.thread_id, message)
    if error is not None:
        scope.failed(error)
    try:
        with scope:
            return await guard._failed_fast(slot, seq, message, call, verdict, why, cancelled)
    finally:
        tel.finish_send(scope)


def traced_send_sync(guard: Guard, thread_id: Any, message: Any, call: Call) -> bool:
    """:meth:`Guard.send_sync_call` with telemetry."""
    tel = guard._tel
    name = thread_name(thread_id)
    scope = Scope(tel.start(SEND, name, 0, event_type_of(message)))
    tel.hook(scope.span, name, message)
    try:
        with scope:
            try:
                return guard._send_sync(thread_id, message, call)
            except EmissionError:
                raise
            except Exception as exc:
                return guard._fault(thread_id, message, exc)
    finally:
        tel.finish_send(scope)
