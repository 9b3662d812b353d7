"""The guarded send as a wrapt wrapper, and its fast paths.

A send to a CONNECTED thread with nothing queued, whose line is free and that nobody needs a
record of, costs a dictionary look-up, the atomic pop of the line's token and a few attribute
checks on top of the original call (``benchmarks/run.py`` measures it against a pass-through
wrapper). It is counted from its seq number, not by a record. Any other send, and any failure
or cancellation on a fast path, goes to the :class:`~emitguard._pipeline.Pipeline`'s general code.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from emitguard._delivery import UNCONFIRMED
from emitguard._ids import names_no_thread
from emitguard._inflight import Flight, InFlight
from emitguard._pipeline import CONNECTED, Pipeline
from emitguard._recorder import thread_name
from emitguard._slot import ThreadSlot
from emitguard._table import ThreadTable
from emitguard._telemetry import SEND
from emitguard.calls import (
    MISSING,
    AnyOf,
    Arg,
    Call,
    Rebind,
    Verdict,
    WraptWrapper,
    judge,
    judge_error,
)
from emitguard.transport import PROBE, Probe

__all__ = ["Senders"]


class Senders:
    """Entry points of a guard's sends: the wrapt wrappers and :meth:`send_call`."""

    def __init__(self, pipeline: Pipeline, table: ThreadTable) -> None:
        self._pipeline = pipeline
        self._table = table
        self._slots = table.slots
        self._flight = InFlight(pipeline, self._noted, self._traced)

    def sender(self, thread: Arg | AnyOf, message: Arg, kind: Arg | None = None) -> WraptWrapper:
        """A wrapt wrapper guarding an async send whose arguments sit at ``thread`` and
        ``message`` (and its event type at ``kind``, when the call names it apart): the plain
        fast path, else :meth:`send_call`."""
        pipeline, send_call, rebind = self._pipeline, self.send_call, message.replace
        if kind is not None or pipeline.delivery.accept is not None:
            return self._general(thread, message, kind)
        recheck = self._table.lines.recheck
        t_index, m_index = thread.reach, message.reach
        width = max(t_index, m_index) if t_index < sys.maxsize > m_index else sys.maxsize
        pair = 2 if (t_index, m_index) == (0, 1) else -1
        pick_thread, pick_message = thread.pick, message.pick

        async def guarded_send(
            wrapped: Callable[..., Awaitable[Any]],
            instance: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> bool:
            if len(args) == pair:
                thread_id, payload = args  # the usual send(thread_id, message)
            elif len(args) > width:
                thread_id, payload = args[t_index], args[m_index]
            else:
                thread_id, payload = pick_thread(args, kwargs), pick_message(args, kwargs)
                if thread_id is MISSING or payload is MISSING:
                    return await send_call(thread_id, payload, wrapped, args, kwargs, rebind)
            try:
                slot = pipeline.fast.get(thread_id)  # empty unless the plain path may serve
            except TypeError:  # unhashable: rejected by send_call
                slot = None
            if (
                slot is None
                or slot.state is not CONNECTED
                or slot.backlog
                or payload is None
                or thread_id.__class__ is bool  # True == 1: never thread 1's slot
            ):
                return await send_call(thread_id, payload, wrapped, args, kwargs, rebind)
            try:
                slot.line.pop()  # take the thread's line (atomic)
            except IndexError:  # busy: wait in line on the general path
                return await send_call(thread_id, payload, wrapped, args, kwargs, rebind)
            seq = slot.seq + 1  # (written once the outcome is known: stats stay exact)
            try:
                result = await (wrapped(*args, **kwargs) if kwargs else wrapped(*args))
            except asyncio.CancelledError:
                call = Call(wrapped, args, kwargs, rebind)
                await pipeline.failed_fast(
                    slot, seq, payload, call, Verdict.RETRY, "cancelled", cancelled=True
                )
                raise
            except Exception as exc:
                verdict, why = judge_error(exc, pipeline.delivery.poison)
                call = Call(wrapped, args, kwargs, rebind)
                return await pipeline.failed_fast(slot, seq, payload, call, verdict, why)
            if not result and result is not None:
                call = Call(wrapped, args, kwargs, rebind)
                return await pipeline.failed_fast(slot, seq, payload, call, *judge(result))
            slot.seq = seq
            slot.line.append(True)  # give the line back, then serve whoever came meanwhile
            if slot.tickets:
                recheck(slot)
            return True  # counted in stats() from the seq numbers: no counter here

        return guarded_send

    def _general(self, thread: Arg | AnyOf, message: Arg, kind: Arg | None) -> WraptWrapper:
        """:meth:`sender` without the plain fast path: for a send whose event type is an
        argument of its own (each call's type is read for its records), or whose result the
        app judges (the ``verdict`` option)."""
        send_call, rebind = self.send_call, message.replace

        async def guarded_send(
            wrapped: Callable[..., Awaitable[Any]],
            instance: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> bool:
            thread_id, payload = thread.pick(args, kwargs), message.pick(args, kwargs)
            name = None
            if kind is not None:
                if payload is MISSING:  # an event with no data: emit("done", to=room)
                    payload = None
                event_type = kind.pick(args, kwargs)
                name = event_type if isinstance(event_type, str) else None
            return await send_call(thread_id, payload, wrapped, args, kwargs, rebind, name)

        return guarded_send

    def sync_sender(
        self, thread: Arg | AnyOf, message: Arg, kind: Arg | None = None
    ) -> WraptWrapper:
        """:meth:`sender` for a synchronous send (it never waits on the barrier)."""
        send, rebind = self.send_sync_call, message.replace

        def guarded_send(
            wrapped: Callable[..., Any],
            instance: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> bool:
            thread_id, payload = thread.pick(args, kwargs), message.pick(args, kwargs)
            event_type = kind.pick(args, kwargs) if kind is not None else None
            name = event_type if isinstance(event_type, str) else None
            if payload is MISSING and kind is not None:  # an event with no data
                payload = None
            return send(thread_id, payload, wrapped, args, kwargs, rebind, name)

        return guarded_send

    def send_call(
        self,
        thread_id: Any,
        message: Any,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
        kind: str | None = None,
    ) -> Coroutine[Any, Any, bool]:
        """A guarded async send (a coroutine to await): the original is ``fn(*args,
        **kwargs)``, and ``rebind(args, kwargs, message)`` returns the arguments with another
        message in them (for seq stamping and for deliveries from the outbox). ``kind``: the
        event type, when the call names it apart from the message.

        A send naming no thread (``thread_id`` ``None`` or missing: a broadcast) is handed
        to the original unchanged and returns what the original returns (PASSED).

        A plain function returning the coroutine of the path it picks, not a coroutine of its
        own: one coroutine frame less on every send that is not on the plain fast path."""
        pipeline = self._pipeline
        try:
            slot = pipeline.lean.get(thread_id)  # empty unless the lean path may serve
        except TypeError:  # unhashable: rejected on the general path
            slot = None
        if (
            slot is not None
            and slot.state is CONNECTED
            and not slot.backlog
            and message is not None
            and message is not MISSING
            and thread_id.__class__ is not bool  # True == 1: never thread 1's slot
        ):
            return self._lean(slot, message, fn, args, kwargs, rebind, kind)
        if pipeline.probe is not None:  # instrumented, no SDK found yet: look again
            pipeline.probe()
        if names_no_thread(thread_id) and not pipeline.closed:
            return pipeline.passed(message, Call(fn, args, kwargs, rebind, kind))
        if pipeline.direct:  # (the fast path, which hands anything else to the general one)
            return self._observed(thread_id, message, fn, args, kwargs, rebind, kind)
        return pipeline.send(thread_id, message, Call(fn, args, kwargs, rebind, kind))

    def send_sync_call(
        self,
        thread_id: Any,
        message: Any,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
        kind: str | None = None,
    ) -> bool:
        """:meth:`send_call` for a synchronous original."""
        pipeline, call = self._pipeline, Call(fn, args, kwargs, rebind, kind)
        if pipeline.probe is not None:  # instrumented, no SDK found yet: look again
            pipeline.probe()
        if names_no_thread(thread_id) and not pipeline.closed:
            return pipeline.passed_sync(message, call)  # type: ignore[no-any-return]
        if pipeline.tel.active:
            with pipeline.tel.sending(thread_name(thread_id), message, kind=kind):
                return pipeline.send_sync(thread_id, message, call)
        return pipeline.send_sync(thread_id, message, call)

    async def _lean(
        self,
        slot: ThreadSlot,
        message: Any,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
        kind: str | None,
    ) -> bool:
        """:meth:`send_call`'s path to a CONNECTED thread with nothing queued while nothing
        observes the sends: the plain path's work, the app's verdict on the result, and the
        replay window. Counted from its seq, as on the plain path; any failure, a busy line or
        a cancellation goes to the general code."""
        pipeline = self._pipeline
        try:
            slot.line.pop()  # take the thread's line (atomic)
        except IndexError:  # taken since we looked: wait in line on the general path
            return await pipeline.send(
                slot.thread_id, message, Call(fn, args, kwargs, rebind, kind)
            )
        seq = slot.seq + 1  # (written once the outcome is known: stats stay exact)
        try:
            result = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            call = Call(fn, args, kwargs, rebind, kind)
            await pipeline.failed_fast(
                slot, seq, message, call, Verdict.RETRY, "cancelled", cancelled=True
            )
            raise
        except Exception as exc:
            verdict, why = judge_error(exc, pipeline.delivery.poison)
            call = Call(fn, args, kwargs, rebind, kind)
            return await pipeline.failed_fast(slot, seq, message, call, verdict, why)
        accept = pipeline.delivery.accept
        if (not result and result is not None) if accept is None else not accept(result):
            call = Call(fn, args, kwargs, rebind, kind)
            return await pipeline.failed_fast(slot, seq, message, call, *judge(result, accept))
        slot.seq = seq
        window = pipeline.window
        if window is not None:  # kept before the line is released, as on the other paths
            window.remember(slot.thread_id, seq, message)
        slot.line.append(True)
        if slot.tickets:
            self._table.lines.recheck(slot)
        return True

    async def _observed(
        self,
        thread_id: Any,
        message: Any,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
        kind: str | None = None,
    ) -> bool:
        """The fast path while a listener, telemetry or transport confirmation is active, or
        messages get a seq stamp or go to the replay window.

        A send to a CONNECTED thread with nothing queued is delivered here (stamped, and kept
        in the window once delivered); then it gets its
        record (for listeners) and its span, started at the time of the call and carrying
        every attribute from the start (no context switch around the call;
        ``docs/performance.md``).
        Every other send runs the general path under an open span, which learns the outcome
        from the record the send concludes with.
        """
        pipeline = self._pipeline
        tel = pipeline.tel
        try:
            slot = self._slots.get(thread_id)
        except TypeError:
            slot = None
        if (
            slot is None
            or thread_id.__class__ is bool
            or slot.state is not CONNECTED
            or slot.backlog
            or message is None
            or message is MISSING
            or not pipeline.direct
            or pipeline.closed
            or not slot.line
            or (slot.flight and slot.flight.joined != slot.joined)  # (waits for the flight to end)
        ):
            with tel.sending(thread_name(thread_id), message, kind=kind):
                return await pipeline.send(thread_id, message, Call(fn, args, kwargs, rebind, kind))
        try:
            slot.line.pop()  # take the thread's line (atomic)
        except IndexError:  # taken since we looked: wait in line on the general path
            with tel.sending(thread_name(thread_id), message, kind=kind):
                return await pipeline.send(thread_id, message, Call(fn, args, kwargs, rebind, kind))
        started = time.time_ns() if tel.active or pipeline.listening else 0
        seq = slot.seq + 1  # (written once the outcome is known: stats stay exact)
        sent = message  # what the original gets: with its seq stamped in, if stamped
        if pipeline.stamps:
            sent = pipeline.stamped(message, seq)
            args, kwargs = rebind(args, kwargs, sent)
        confirm = pipeline.delivery.confirm
        probe = token = None
        if confirm is not None:  # (transport.open_probe, inlined: this path is hot)
            probe = Probe()
            token = PROBE.set(probe)
        verdict = error = why = None  # verdict None: delivered
        try:
            try:
                result = await fn(*args, **kwargs)
            finally:
                if token is not None:
                    try:  # noqa: SIM105 (transport.close_probe, inlined: suppress() costs more)
                        PROBE.reset(token)
                    except ValueError:  # closed from another context (loop teardown)
                        pass
            accept = pipeline.delivery.accept
            if (not result and result is not None) if accept is None else not accept(result):
                verdict, why = judge(result, accept)
            elif probe is not None and probe.dropped is not None:
                verdict, why = Verdict.RETRY, probe.dropped
            elif probe is not None and not probe.frames:
                if probe.tag is not None and self._flight.takes(slot):  # confirmed behind
                    slot.seq = seq
                    call = Call(fn, args, kwargs, rebind, kind)
                    self._flight.hand(slot, Flight(seq, message, sent, call, probe, started))
                    slot.line.append(True)
                    if slot.tickets:
                        self._table.lines.recheck(slot)
                    return True
                if not await probe.wait(confirm or 0.0, slot.owners):
                    verdict, why = Verdict.RETRY, UNCONFIRMED
        except asyncio.CancelledError:  # during the send or its confirmation: keep the event
            if probe is not None:
                probe.done()
            call = Call(fn, args, kwargs, rebind, kind)
            with tel.sending(slot.thread_id, message, seq, started or None, kind=kind):
                await pipeline.failed_fast(
                    slot, seq, message, call, Verdict.RETRY, "cancelled", cancelled=True
                )
            raise
        except Exception as exc:
            verdict, why = judge_error(exc, pipeline.delivery.poison)
            error = exc
        if probe is not None:
            probe.done()
        if verdict is not None:
            call = Call(fn, args, kwargs, rebind, kind)
            with tel.sending(slot.thread_id, message, seq, started or None, error, kind):
                return await pipeline.failed_fast(slot, seq, message, call, verdict, why)
        slot.seq = seq
        # Recorded while the line is held, as on the general path: a waiter woken by the
        # release may deliver (and record) the next seq at once.
        self._noted(slot, seq, sent, probe, started, kind)
        slot.line.append(True)
        if slot.tickets:
            self._table.lines.recheck(slot)
        if tel.active:  # (off when only a listener or confirmation brought the send here)
            self._traced(slot, seq, sent, started, kind)
        return True

    def _noted(
        self,
        slot: ThreadSlot,
        seq: int,
        sent: Any,
        probe: Probe | None,
        started: int,
        kind: str | None,
    ) -> None:
        """A delivery on the observed fast path worked: the connections it went through
        carry the thread, and its record (for listeners) or the replay window has it."""
        pipeline = self._pipeline
        if (
            probe is not None
            and (owner := probe.owner) is not None
            and (probe.more is not None or owner not in slot.owners)
        ):  # a new carrier connection
            for new in probe.outside(slot.owners):
                self._table.own(slot, new)
        if pipeline.listening:  # the record counts it, tells telemetry, feeds the window
            pipeline.delivered_fast(slot, seq, sent, started / 1e9, kind)
        elif pipeline.window is not None:
            pipeline.window.remember(slot.thread_id, seq, sent)

    def _traced(
        self, slot: ThreadSlot, seq: int, sent: Any, started: int, kind: str | None
    ) -> None:
        """The span of a delivery on the observed fast path (telemetry is active)."""
        tel = self._pipeline.tel
        if not tel.active:
            return
        event_type = kind if kind is not None else tel.type_of(sent)
        if not self._pipeline.listening:
            tel.delivered(event_type)
        span = tel.start(SEND, slot.thread_id, seq, event_type, start_time=started, delivered=True)
        if span is not None:
            tel.hook(span, slot.thread_id, sent)
            span.end()
