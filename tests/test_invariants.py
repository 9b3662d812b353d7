"""The engine's invariants (DESIGN.md section 4) under random interleavings.

A hypothesis state machine drives one :class:`emitguard.Guard` on an event loop it owns:
associations, owner disconnects, ``mark_disconnected``, sockets going down (the send of a
thread then returns False or raises), sends (awaited, concurrent tasks, synchronous, bad
inputs), cancelled senders, time passing (TTL, readiness barrier), small bounds with every
overflow policy, and ``drain``. A listener collects every record; after every step the
records, the guard's counters, the outbox and what the fake sockets received must agree.

The plain tests at the end pin down tricky interleavings found while writing the machine.
The fakes and the ledger live in ``support.py`` (the differential machine uses them too).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import emitguard
from emitguard import ConnectionState, Guard, Outcome
from support import EVENT_TYPES, OWNERS, THREADS, Gate, Ledger, Sockets

# -- the state machine ----------------------------------------------------------------


class GuardMachine(RuleBasedStateMachine):
    """Random interleavings of everything that can happen to a guard."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.guard: Guard | None = None
        self.ledger: Ledger | None = None
        self.sockets = Sockets()

    # -- setup ----------------------------------------------------------------------

    @initialize(
        on_unready=st.sampled_from(["wait", "buffer"]),
        ready_timeout=st.sampled_from([0.0, 0.01, 1.0]),
        ttl=st.sampled_from([None, None, None, 0.02]),
        max_per_thread=st.sampled_from([1000, 1, 2, 3, 1000]),
        max_total=st.sampled_from([100_000, 2, 4, 100_000]),
        overflow=st.sampled_from(["drop_oldest", "drop_newest", "reject"]),
        protect=st.sampled_from([frozenset(), frozenset({"critical"})]),
        yields=st.sampled_from([1, 0, 2, 3]),
        raises=st.booleans(),
    )
    def setup(
        self,
        on_unready: str,
        ready_timeout: float,
        ttl: float | None,
        max_per_thread: int,
        max_total: int,
        overflow: str,
        protect: frozenset[str],
        yields: int,
        raises: bool,
    ) -> None:
        self.sockets = Sockets(yields=yields, raises=raises)
        self.guard = Guard(
            name="machine",
            on_unready=on_unready,
            ready_timeout=ready_timeout,
            ttl=ttl,
            max_per_thread=max_per_thread,
            max_total=max_total,
            overflow=overflow,
            protect=protect,
            stamp_seq="seq",
        )
        self.ledger = Ledger(self.guard, self.sockets)
        emitguard.register(self.ledger)

    @property
    def g(self) -> Guard:
        assert self.guard is not None
        return self.guard

    @property
    def led(self) -> Ledger:
        assert self.ledger is not None
        return self.ledger

    def run(self, awaitable: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(awaitable)

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.run(asyncio.sleep(0))

    def pending_tasks(self) -> list[asyncio.Task[bool]]:
        return [s.task for s in self.led.sent if s.task is not None and not s.task.done()]

    # -- the connection side ------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn`` from a coroutine on the machine's loop, as a handler of the app would."""

        async def call() -> Any:
            return fn(*args)

        return self.run(call())

    @rule(thread=st.sampled_from(THREADS), owner=st.sampled_from(OWNERS), up=st.booleans())
    def associate(self, thread: str, owner: str, up: bool) -> None:
        """The thread is tied to a connection of ``owner`` (usually a live one), from a
        coroutine on the loop (a handler of the app)."""
        if up:
            self.sockets.up[thread] = True
        self.call(self.g.mark_connected, thread, owner)

    @rule(thread=st.sampled_from(THREADS), owner=st.sampled_from(OWNERS), up=st.booleans())
    def associate_from_plain_code(self, thread: str, owner: str, up: bool) -> None:
        """The same from plain code while the loop is paused (``run_until_complete`` style),
        as a synchronous association call may be made."""
        if up:
            self.sockets.up[thread] = True
        self.g.mark_connected(thread, owner)

    @rule(
        how=st.sampled_from(["owner", "owner and sockets", "thread", "socket down", "socket up"]),
        thread=st.sampled_from(THREADS),
        owner=st.sampled_from(OWNERS),
    )
    def connection_change(self, how: str, thread: str, owner: str) -> None:
        """An owner goes away, a thread is marked disconnected, or a socket goes down or up
        behind the guard's back (its sends then fail, or work again)."""
        if how.startswith("owner"):
            gone = self.call(self.g.disconnect_owner, owner)
            for name in gone:
                assert self.g.state(name) is ConnectionState.DISCONNECTED
                if how == "owner and sockets":
                    self.sockets.up[name] = False
        elif how == "thread":
            self.call(self.g.mark_disconnected, thread)
            assert self.g.state(thread) is ConnectionState.DISCONNECTED
        else:
            self.sockets.up[thread] = how == "socket up"

    # -- sends ------------------------------------------------------------------------

    @rule(
        thread=st.sampled_from(THREADS),
        event_type=st.sampled_from(EVENT_TYPES),
        how=st.sampled_from(["task", "task", "awaited", "sync in loop", "sync", "bad"]),
    )
    def send(self, thread: str, event_type: str, how: str) -> None:
        """One send: started as a task (it runs on while later rules run), awaited (for a
        little while: a send waiting on the barrier goes on as a task), synchronous (from a
        coroutine or from plain code), or with a bad input."""
        if how == "bad":
            self.send_bad(thread, event_type)
            return
        sent, message = self.led.new(thread, event_type)
        if how.startswith("sync"):
            args = (thread, message, self.sockets.deliver_sync(thread))
            if how == "sync":
                sent.result = self.g.send_sync(*args)
            else:
                sent.result = self.call(self.g.send_sync, *args)
            sent.handed = not any(r.message["uid"] == sent.uid for r in self.led.records if r.seq)
            return
        sent.task = self.loop.create_task(
            self.g.send(thread, message, self.sockets.deliver(thread))
        )
        if how == "awaited":
            self.run(asyncio.wait({sent.task}, timeout=0.02))
        else:
            self.tick()  # the send starts now: call order is the order of these rules

    @rule(
        threads=st.lists(st.sampled_from(THREADS), min_size=2, max_size=4),
        event_type=st.sampled_from(EVENT_TYPES),
    )
    def send_burst(self, threads: list[str], event_type: str) -> None:
        """Concurrent sends: tasks started together, in this order."""
        for thread in threads:
            sent, message = self.led.new(thread, event_type)
            send = self.g.send(thread, message, self.sockets.deliver(thread))
            sent.task = self.loop.create_task(send)
        self.tick()

    def send_bad(self, thread: str, event_type: str) -> None:
        bad_thread: Any = {"t1": "", "t2": True}.get(thread, thread)
        message = None if bad_thread == thread else {"type": event_type}
        self.led.bad += 1
        assert self.run(self.g.send(bad_thread, message, self.sockets.deliver(thread))) is False

    @rule(pick=st.integers(0, 7))
    def cancel(self, pick: int) -> None:
        """The caller of a send still in flight goes away (its task is cancelled)."""
        # No precondition on the tasks in flight: that depends on the clock, and hypothesis
        # needs the same draws to make the same choices.
        tasks = self.pending_tasks()
        if tasks:
            tasks[pick % len(tasks)].cancel()
        self.tick()

    # -- time -------------------------------------------------------------------------

    @rule(times=st.integers(1, 5))
    def run_loop(self, times: int) -> None:
        self.tick(times)

    @rule(seconds=st.sampled_from([0.005, 0.03]))
    def sleep(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    @rule()
    def drain(self) -> None:
        in_flight = len(self.pending_tasks())
        left = self.run(self.g.drain(timeout=0.02))
        # Afterwards stats() may have expired more; and a send still in flight when drain()
        # returned may have buffered since (its barrier wait timed out in the same loop run,
        # which a loaded machine makes likely): at most one event each.
        assert self.g.stats().pending_total <= left + in_flight

    # -- checks -----------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        self.led.check()

    def teardown(self) -> None:
        failing = sys.exc_info()[1] is not None
        try:
            if self.guard is not None and not failing:
                self.settle()
                self.led.check_settled()
                self.check_final_outcomes()
        finally:
            self.close()

    def settle(self) -> None:
        async def settle() -> None:
            for thread in THREADS:
                self.sockets.up[thread] = True
                self.g.mark_connected(thread, OWNERS[0])
            for _ in range(10):  # a send still in flight after this is stuck for good
                tasks = self.pending_tasks()
                if tasks:
                    await asyncio.wait(tasks, timeout=0.05)
                left = await self.g.drain(timeout=0.2)
                if not left and not self.pending_tasks():
                    return

        self.run(settle())

    def check_final_outcomes(self) -> None:
        """Only what the configuration allows ended badly: EXPIRED needs a TTL, DROPPED a
        bound that drops, REJECTED with a seq a bound that rejects; nothing FAILED (the fake
        sends only fail the retryable way)."""
        opts = self.g.options
        seen = {record.outcome for record in self.led.records}
        failed = [record for record in self.led.records if record.outcome is Outcome.FAILED]
        assert not failed, failed
        bounded = opts.max_per_thread < 1000 or opts.max_total < 100_000
        if opts.ttl is None:
            assert Outcome.EXPIRED not in seen
        if not bounded or opts.overflow == "reject":
            assert Outcome.DROPPED not in seen
        if opts.overflow != "reject" or not bounded:
            assert not [r for r in self.led.records if r.outcome is Outcome.REJECTED and r.seq]

    def close(self) -> None:
        try:
            if self.guard is not None:
                self.run(self.g.aclose())
            for _ in range(10):  # cancelling a sender may start work that outlives it
                self.tick()  # callbacks scheduled from plain code may start tasks too
                leftover = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
                if not leftover:
                    break
                for task in leftover:
                    task.cancel()
                self.run(asyncio.gather(*leftover, return_exceptions=True))
            self.run(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            if self.ledger is not None:
                emitguard.unregister(self.ledger)


GuardMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGuardMachine = GuardMachine.TestCase


# -- deterministic interleavings ----------------------------------------------------------


@contextlib.asynccontextmanager
async def watched(**options: Any) -> AsyncIterator[tuple[Guard, Sockets, Ledger]]:
    """A guard (seq stamped, no TTL unless given), its fake sockets and a ledger listening."""
    sockets = Sockets()
    guard = Guard(**{"stamp_seq": "seq", "ttl": None, **options})
    ledger = Ledger(guard, sockets)
    emitguard.register(ledger)
    try:
        yield guard, sockets, ledger
    finally:
        emitguard.unregister(ledger)
        await guard.aclose()
        for sent in ledger.sent:
            if sent.task is not None:
                sent.task.cancel()
        await asyncio.gather(
            *(sent.task for sent in ledger.sent if sent.task is not None), return_exceptions=True
        )


def start(guard: Guard, sockets: Sockets, ledger: Ledger, thread: str = "t1") -> asyncio.Task[bool]:
    """Start one send as a task (it runs when the test gives the loop away)."""
    sent, message = ledger.new(thread)
    sent.task = asyncio.ensure_future(guard.send(thread, message, sockets.deliver(thread)))
    return sent.task


async def ticks(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def settle(guard: Guard, ledger: Ledger) -> None:
    tasks = [sent.task for sent in ledger.sent if sent.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=1.0)
    await guard.drain(timeout=1.0)


def seqs(sockets: Sockets, thread: str = "t1") -> list[int]:
    return [message["seq"] for message in sockets.received[thread]]


async def test_association_wakes_the_waiting_send_then_the_line_behind_it_in_order() -> None:
    async with watched(ready_timeout=5.0) as (guard, sockets, ledger):
        sockets.up["t1"] = True
        first = start(guard, sockets, ledger)  # waits on the barrier, holding the line
        await ticks()
        second = start(guard, sockets, ledger)  # waits in line behind it
        await ticks()
        sent, message = ledger.new("t1")  # a synchronous send meanwhile does not block:
        sent.result = guard.send_sync("t1", message, sockets.deliver_sync("t1"))
        assert sent.result is True  # accepted; the line's holders deliver it in its turn
        assert ledger.records == []

        guard.mark_connected("t1", "alice")
        await settle(guard, ledger)

        assert seqs(sockets) == [1, 2, 3]
        assert first.result() is True
        assert second.result() is True
        by_key = ledger.check_settled()
        assert by_key[("t1", 1)][0].outcome is Outcome.DELIVERED
        assert by_key[("t1", 1)][0].waited > 0
        assert [r.outcome for r in by_key[("t1", 3)]] == [Outcome.DELIVERED]


async def test_a_failed_flush_stops_in_order_and_sends_during_it_queue_behind() -> None:
    async with watched(on_unready="buffer", retry_backoff=()) as (guard, sockets, ledger):
        for _ in range(3):
            sent, message = ledger.new("t1")
            sent.result = await guard.send("t1", message, sockets.deliver("t1"))
        gate = sockets.gates["t1", 2] = Gate()
        sockets.up["t1"] = True
        guard.mark_connected("t1", "alice")
        await asyncio.wait_for(gate.entered.wait(), 1.0)  # seq 1 flushed, seq 2 in flight

        during = start(guard, sockets, ledger)  # seq 4: must not overtake 2 and 3
        await ticks()
        sockets.up["t1"] = False
        gate.open()  # seq 2 fails: the flush stops, the thread is disconnected
        assert await asyncio.wait_for(during, 1.0) is True
        assert guard.state("t1") is ConnectionState.DISCONNECTED
        assert seqs(sockets) == [1]
        by_key = ledger.check()
        assert by_key["t1", 4][0].outcome is Outcome.BUFFERED

        sockets.up["t1"] = True
        guard.mark_connected("t1", "alice")
        await settle(guard, ledger)
        assert seqs(sockets) == [1, 2, 3, 4]
        by_key = ledger.check_settled()
        assert by_key["t1", 2][-1].attempts == 2


async def test_a_cancelled_sender_waiting_in_line_keeps_its_place() -> None:
    async with watched(ready_timeout=5.0) as (guard, sockets, ledger):
        sockets.up["t1"] = True
        start(guard, sockets, ledger)  # waits on the barrier, holding the line
        await ticks()
        second = start(guard, sockets, ledger)
        third = start(guard, sockets, ledger)
        await ticks()
        second.cancel()
        await ticks()
        ledger.check()

        guard.mark_connected("t1", "alice")
        await settle(guard, ledger)
        assert second.cancelled()
        assert seqs(sockets) == [1, 2, 3]
        assert third.result() is True
        ledger.check_settled()


async def test_an_event_being_flushed_is_not_evicted_for_another_thread() -> None:
    """The global bound evicts the oldest entry of any thread, but not one that a flush of
    its thread is delivering at that moment (found by the machine: it was recorded DROPPED,
    then FLUSHED when the delivery worked, and the outbox counters went negative)."""
    async with watched(on_unready="buffer", max_total=2) as (guard, sockets, ledger):
        for _ in range(2):
            sent, message = ledger.new("t1")
            sent.result = await guard.send("t1", message, sockets.deliver("t1"))
        gate = sockets.gates["t1", 1] = Gate()
        sockets.up["t1"] = True
        guard.mark_connected("t1", "alice")
        await asyncio.wait_for(gate.entered.wait(), 1.0)  # the flush is delivering t1 seq 1

        sent, message = ledger.new("t2")  # the outbox is full: something must give
        sent.result = await guard.send("t2", message, sockets.deliver("t2"))
        ledger.check()

        gate.open()
        sockets.up["t2"] = True
        guard.mark_connected("t2", "alice")
        await settle(guard, ledger)
        ledger.check_settled()


async def test_a_sender_cancelled_while_it_flushes_older_events_keeps_its_own() -> None:
    """A sender that finds older events buffered flushes them before its own. Cancelled
    during that flush, its own event must still be buffered (found by the machine: it
    vanished, with a seq given out and no record at all)."""
    async with watched(ready_timeout=5.0) as (guard, sockets, ledger):
        first = start(guard, sockets, ledger)  # seq 1 waits on the barrier
        await ticks()
        second = start(guard, sockets, ledger)  # seq 2 waits in line
        await ticks()
        first.cancel()  # seq 1 is buffered; seq 2 takes the line and waits on the barrier
        await ticks(10)
        gate = sockets.gates["t1", 1] = Gate()
        sockets.up["t1"] = True
        guard.mark_connected("t1", "alice")
        await asyncio.wait_for(gate.entered.wait(), 1.0)  # seq 1 is being flushed
        second.cancel()
        await ticks()
        gate.open()
        await settle(guard, ledger)
        assert seqs(sockets) == [1, 2]
        ledger.check_settled()


@contextlib.contextmanager
def paused_loop(
    *, yields: int = 0, **options: Any
) -> Iterator[tuple[asyncio.AbstractEventLoop, Guard, Sockets, Ledger]]:
    """A loop driven step by step with ``run_until_complete`` (paused in between), and a
    watched guard; tasks left are cancelled and the loop is closed afterwards."""
    loop = asyncio.new_event_loop()
    sockets = Sockets(yields=yields)
    guard = Guard(**{"stamp_seq": "seq", "ttl": None, **options})
    ledger = Ledger(guard, sockets)
    emitguard.register(ledger)
    try:
        yield loop, guard, sockets, ledger
    finally:
        emitguard.unregister(ledger)
        for sent in ledger.sent:
            if sent.task is not None:
                sent.task.cancel()
        loop.run_until_complete(guard.aclose())
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def test_association_from_plain_code_while_the_loop_is_paused() -> None:
    """``mark_connected`` from plain code while sends wait on a loop that is only paused
    (driven by ``run_until_complete``), as a synchronous association call may be.

    Found by the machine: the guard took the line's holder for dead, freed the line and
    flushed in a private loop at once; the buffered seq 3 overtook seq 1, and seq 2, left
    waiting in line, was never resumed. (Earlier still, it deadlocked: the private flush
    waited for the line held on the paused loop.)"""
    with paused_loop(ready_timeout=5.0) as (loop, guard, sockets, ledger):
        sockets.up["t1"] = True
        for _ in range(2):  # seq 1 waits on the barrier, seq 2 waits in line
            sent, message = ledger.new("t1")
            sent.task = loop.create_task(guard.send("t1", message, sockets.deliver("t1")))
            loop.run_until_complete(ticks())
        sent, message = ledger.new("t1")
        sent.result = guard.send_sync("t1", message, sockets.deliver_sync("t1"))

        guard.mark_connected("t1", "alice")  # plain code; the loop is not running

        tasks = [s.task for s in ledger.sent if s.task is not None]
        loop.run_until_complete(asyncio.wait(tasks, timeout=0.5))
        loop.run_until_complete(guard.drain(timeout=0.5))
        assert seqs(sockets) == [1, 2, 3]
        ledger.check_settled()


def test_association_from_plain_code_while_a_flush_is_in_flight_on_the_paused_loop() -> None:
    """Found by the machine (shrunk): a flush parked inside the send on a paused loop, and
    the same thread associated again from plain code. The guard flushed the event again in
    a private loop, and the parked delivery then completed too: seq 1 reached the socket
    twice."""
    with paused_loop(on_unready="buffer") as (loop, guard, sockets, ledger):
        sent, message = ledger.new("t1")
        sent.result = loop.run_until_complete(guard.send("t1", message, sockets.deliver("t1")))
        sockets.up["t1"] = True
        gate = sockets.gates["t1", 1] = Gate()

        async def associate() -> None:
            guard.mark_connected("t1", "alice")
            await asyncio.wait_for(gate.entered.wait(), 1.0)  # the flush is in the send

        loop.run_until_complete(associate())
        guard.mark_connected("t1", "alice")  # plain code; the loop is not running
        gate.open()

        loop.run_until_complete(guard.drain(timeout=0.5))
        assert seqs(sockets) == [1]
        ledger.check_settled()
