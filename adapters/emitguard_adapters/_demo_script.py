"""The order of one socket-demo run, fixed by its seeded plan.

A run's plan (:class:`emitguard.demo.RunPlan`) puts each step on a timeline: the agent's
events at the sums of its gaps, the thread association at ``associate_after``, and for a run
that drops, the drop after event ``after_event`` (once associated), the reconnection
``reconnect_after`` later and the new association ``reassociate_after`` after that. On real
sockets two steps a few milliseconds apart can swap with the machine's load, so the demo does
not leave the order to the clock: every step waits for the steps the timeline puts before it
(:class:`Script`). The sleeps stay, so latencies still mean something; only the order is
enforced, and with it what a bare app loses.

A drop is one of two kinds (the plan's ``kind``, drawn from the seed):

- ``drop_connection``, **silent**: the connection dies without the server noticing. The
  client stops keeping what arrives; the events the agent sends until the client reconnects
  are written into the dead connection and swallowed. The server notices when the client
  kills the socket on reconnecting.
- ``disconnect_user``, **noticed**: the client kills its socket and the server sees the
  disconnect before the agent's next event, which finds no connection.
"""

from __future__ import annotations

import asyncio
import dataclasses

from emitguard.demo import EVENTS, RunPlan

__all__ = ["Script", "Timeline"]


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Where a run's steps fall, as counts of the agent's events before each step."""

    early: int
    """Events sent before the thread association."""
    before_drop: int
    """Events sent on the first connection before it drops (all of them without a drop)."""
    before_reconnect: int
    """Events sent before the client's new connection (swallowed by a silent drop)."""
    before_reassociation: int
    """Events sent before the new connection's thread association."""
    silent: bool

    @classmethod
    def of(cls, plan: RunPlan) -> Timeline:
        times = [sum(plan.gaps[:index]) for index in range(len(EVENTS))]

        def before(moment: float, at_least: int = 0) -> int:
            return max(at_least, sum(1 for time in times if time < moment))

        early = before(plan.associate_after)
        drop = plan.drop
        if drop is None:
            total = len(EVENTS)
            return cls(early, total, total, total, silent=False)
        dropped_at = max(plan.associate_after, times[drop.after_event - 1])
        before_drop = max(early, drop.after_event)
        reconnect_at = dropped_at + drop.reconnect_after
        before_reconnect = before(reconnect_at, before_drop)
        before_reassociation = before(reconnect_at + drop.reassociate_after, before_reconnect)
        silent = drop.kind == "drop_connection"
        return cls(early, before_drop, before_reconnect, before_reassociation, silent)

    @property
    def swallowed(self) -> int:
        """Events a silent drop swallows: written into the dead connection before the client
        reconnects (lost by any app that does not replay them)."""
        return self.before_reconnect - self.before_drop if self.silent else 0

    @property
    def bare_loss(self) -> int:
        """What a bare app loses in this run: the events sent before the association, and
        after a drop every event sent before the new association."""
        return self.early + self.before_reassociation - self.before_drop


class _Count:
    """A counter one can wait on reaching a value."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = asyncio.Condition()

    async def bump(self) -> None:
        async with self._changed:
            self.value += 1
            self._changed.notify_all()

    async def reach(self, target: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.value >= target)


class Script:
    """The milestones of one run, awaited by the agent, the endpoint and the client."""

    def __init__(self, plan: RunPlan, *, gated: bool) -> None:
        self.plan = plan
        self.gated = gated
        """The app is guarded: a send before the association waits at the readiness barrier,
        so the agent hands over the first event and no more before the association."""
        self.timeline = Timeline.of(plan)
        self.handed = _Count()
        """Events handed to the manager (their send has started and may be parked)."""
        self.completed = _Count()
        """Events whose send returned."""
        self.associated = asyncio.Event()
        self.dropped = asyncio.Event()
        """The agent may send the events after the drop."""
        self.old_closed = asyncio.Event()
        """The server saw the first connection end."""
        self.reconnected = asyncio.Event()
        self.reassociated = asyncio.Event()

    async def ready_to_associate(self) -> None:
        """Wait until the events the timeline sends before the association are handed over
        (a guarded app's first one parks at the barrier, which the association lifts)."""
        early = self.timeline.early
        if self.gated:
            await self.handed.reach(min(early, 1))
        else:
            await self.completed.reach(early)

    async def before_event(self, number: int) -> None:
        """Wait until every step the timeline puts before event ``number`` (1-based) is done."""
        line = self.timeline
        if number > line.early:
            await self.associated.wait()
        if number > line.before_drop:
            await self.dropped.wait()
        if number > line.before_reconnect:
            await self.reconnected.wait()
        if number > line.before_reassociation:
            await self.reassociated.wait()
