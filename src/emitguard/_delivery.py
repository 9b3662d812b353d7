"""One call of the original send, and what it means: the verdict every path shares.

While deliveries are confirmed (a transport adapter said it sees the wire), an async send that
reports success counts only when a frame left; the connections that carried it then own the
thread. A thread's subscriptions get every delivery too, and one that took it makes the
delivery count even when the original found no socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from emitguard import transport
from emitguard._loops import alive, running_loop
from emitguard._slot import ThreadSlot
from emitguard._telemetry import Telemetry
from emitguard.calls import Accept, Verdict, judge, judge_error

__all__ = ["UNCONFIRMED", "Delivery", "acceptance", "fan_out"]

log = logging.getLogger("emitguard")

UNCONFIRMED = (
    "unconfirmed: the send reported success but no frame left through the transport, "
    "neither from the send nor on a connection carrying the thread (a shortcut that returns "
    "True without sending?)"
)


class Delivery:
    """Calls the original send once for a message and judges the result."""

    def __init__(
        self,
        telemetry: Telemetry,
        poison: tuple[type[BaseException], ...],
        adopt: Callable[[ThreadSlot, transport.Probe], None],
        verdict: Callable[[Any], bool] | str | None = None,
    ) -> None:
        self._tel = telemetry
        self.poison = poison
        self.accept = acceptance(verdict)
        """How a returned result is read (the ``verdict`` option); ``None``: the default."""
        self.confirm: float | None = None
        """Seconds to wait for a transport to confirm a delivery; ``None``: no confirmation."""
        self._adopt = adopt

    async def attempt(
        self,
        deliver: Callable[[Any], Any],
        message: Any,
        is_async: bool,
        slot: ThreadSlot,
        seq: int,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[Verdict, str | None]:
        """Call ``deliver(message)`` once and judge it; cancellation propagates. An async
        send made on another loop that still runs is called there (``loop``)."""
        if is_async and loop is not None and loop is not running_loop() and alive(loop):
            coro = self._attempt(deliver, message, is_async, slot, seq)
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
        return await self._attempt(deliver, message, is_async, slot, seq)

    async def _attempt(
        self,
        deliver: Callable[[Any], Any],
        message: Any,
        is_async: bool,
        slot: ThreadSlot,
        seq: int,
    ) -> tuple[Verdict, str | None]:
        probe = token = None
        if self.confirm is not None and is_async:
            probe, token = transport.open_probe()
        try:
            try:
                result = deliver(message)
                if is_async:
                    result = await result
            except Exception as exc:
                if self._tel.active:
                    self._tel.failed_attempt(exc)
                failed, text = judge_error(exc, self.poison)
                if failed is Verdict.RETRY and fan_out(slot, seq, message):
                    return Verdict.OK, None
                return failed, text
            finally:
                if token is not None:
                    transport.close_probe(token)
            verdict, why = judge(result, self.accept)
            if slot.subscribers and fan_out(slot, seq, message):
                return Verdict.OK, None
            if probe is not None and verdict is Verdict.OK:
                if probe.dropped is not None:
                    return Verdict.RETRY, probe.dropped
                if not probe.frames and not await probe.wait(self.confirm or 0.0, slot.owners):
                    return Verdict.RETRY, UNCONFIRMED
                self._adopt(slot, probe)
            return verdict, why
        finally:
            if probe is not None:  # decided, however: its tag confirms nothing any more
                probe.done()


def acceptance(verdict: Callable[[Any], bool] | str | None) -> Accept | None:
    """The ``verdict`` option as a function ``accept(result) -> bool`` (``None``: the
    default reading). A user's verdict that raises is logged, and the result taken as
    delivered: the send itself did not fail."""
    if verdict is None:
        return None
    if verdict == "none_is_failure":
        return bool
    assert callable(verdict)
    judge_result = verdict
    failed = False

    def accept(result: Any) -> bool:
        nonlocal failed
        try:
            return bool(judge_result(result))
        except Exception:
            level = logging.DEBUG if failed else logging.WARNING
            failed = True
            log.log(
                level,
                "emitguard verdict %r raised; taken as delivered",
                judge_result,
                exc_info=True,
            )
            return True

    return accept


def fan_out(slot: ThreadSlot, seq: int, message: Any) -> bool:
    """Hand a delivery to the thread's subscriptions; True when one took it."""
    took = False
    for subscription in list(slot.subscribers):
        took = subscription.offer(seq, message) or took
    return took
