"""The guarded send as a wrapt wrapper: the path every event to a healthy thread takes.

A send to a CONNECTED thread with nothing queued, no listener and no seq stamping costs a
dictionary look-up and a few attribute checks on top of the original call; everything else goes
to :meth:`Guard.send_call`. ``benchmarks/run.py`` measures it against a pass-through wrapper.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from emitguard._core import CONNECTED
from emitguard._traced import traced_send
from emitguard.calls import MISSING, Arg, Call, Verdict, WraptWrapper, judge, judge_error

if TYPE_CHECKING:
    from emitguard.guard import Guard


def make_sender(guard: Guard, thread: Arg, message: Arg) -> WraptWrapper:
    """A wrapt wrapper guarding an async send whose arguments sit at ``thread``/``message``."""
    send_call, rebind = guard.send_call, message.replace
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
            slot = guard._hot.get(thread_id)  # empty while anyone listens or seqs are stamped
        except TypeError:  # unhashable: rejected by send_call
            slot = None
        if (
            slot is None
            or slot.state is not CONNECTED
            or slot.busy
            or slot.backlog
            or payload is None
        ):
            if guard._instrumented:  # spans, metrics or confirmation: not the hot path
                return await traced_send(guard, thread_id, payload, wrapped, args, kwargs, rebind)
            return await send_call(thread_id, payload, wrapped, args, kwargs, rebind)
        slot.busy = True
        slot.seq = seq = slot.seq + 1
        try:
            result = await (wrapped(*args, **kwargs) if kwargs else wrapped(*args))
        except asyncio.CancelledError:
            call = Call(wrapped, args, kwargs, rebind)
            await guard._failed_fast(slot, seq, payload, call, Verdict.RETRY, "cancelled", True)
            raise
        except Exception as exc:
            verdict, why = judge_error(exc, guard._poison)
            call = Call(wrapped, args, kwargs, rebind)
            return await guard._failed_fast(slot, seq, payload, call, verdict, why)
        if not result and result is not None:
            call = Call(wrapped, args, kwargs, rebind)
            verdict, reason = judge(result)
            return await guard._failed_fast(slot, seq, payload, call, verdict, reason or "")
        if slot.queue or slot.backlog:
            guard._leave(slot)
        else:
            slot.busy = False
        return True  # counted in stats() from the seq numbers: no counter on the hot path

    return guarded_send


def make_sync_sender(guard: Guard, thread: Arg, message: Arg) -> WraptWrapper:
    """:func:`make_sender` for a synchronous send (it never waits on the barrier)."""
    send, rebind = guard.send_sync_call, message.replace

    def guarded_send(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bool:
        thread_id, payload = thread.pick(args, kwargs), message.pick(args, kwargs)
        return send(thread_id, payload, wrapped, args, kwargs, rebind)

    return guarded_send
