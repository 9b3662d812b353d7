"""The engine's invariants (DESIGN.md section 4) under random interleavings.

A hypothesis state machine drives one :class:`emitguard.Guard` on an event loop it owns:
associations, owner disconnects, ``mark_disconnected``, sockets going down (the send of a
thread then returns False or raises), sends (awaited, concurrent tasks, synchronous, bad
inputs), cancelled senders, time passing (TTL, readiness barrier), small bounds with every
overflow policy, and ``drain``. A listener collects every record; after every step the
records, the guard's counters, the outbox and what the fake sockets received must agree.

The plain tests at the end pin down tricky interleavings found while writing the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
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
from emitguard import ConnectionState, Emission, Guard, Outcome
from emitguard.outbox import drive

THREADS = ("t1", "t2", "t3")
OWNERS = ("alice", "bob")
EVENT_TYPES = ("token", "critical", "agent_started")
FIRST_OK = frozenset({Outcome.DELIVERED, Outcome.BUFFERED})
REACHED = frozenset({Outcome.DELIVERED, Outcome.FLUSHED})
AFTER_BUFFERED = frozenset({Outcome.FLUSHED, Outcome.DROPPED, Outcome.EXPIRED, Outcome.FAILED})

Message = dict[str, Any]


# -- fakes ------------------------------------------------------------------------


class Sockets:
    """One deterministic fake socket per thread, each with an up/down flag.

    A send records the message only when it reports success, so every message a socket
    holds was handed over exactly once by the guard (no legitimate at-least-once duplicate).
    """

    def __init__(self, *, yields: int = 0, raises: bool = False) -> None:
        self.up = dict.fromkeys(THREADS, False)
        self.received: dict[str, list[Message]] = {thread: [] for thread in THREADS}
        self.misrouted: list[tuple[str, Any]] = []
        self.yields = yields
        """How many times an async send gives the loop away before it looks at the socket."""
        self.raises = raises
        """A send to a down socket raises ConnectionError instead of returning False."""
        self.gates: dict[tuple[str, int], Gate] = {}
        """Deliveries of ``(thread, seq)`` that wait until the test opens their gate."""

    def take(self, thread: str, message: Any) -> bool:
        if not isinstance(message, dict) or message.get("to") != thread:
            self.misrouted.append((thread, message))
        if not self.up[thread]:
            if self.raises:
                raise ConnectionError(f"socket of {thread} is down")
            return False
        self.received[thread].append(message)
        return True

    def deliver(self, thread: str) -> Callable[[Any], Awaitable[bool]]:
        """The original async send bound to ``thread`` (what an adapter hands the guard)."""

        async def deliver(message: Any) -> bool:
            for _ in range(self.yields):
                await asyncio.sleep(0)
            gate = self.gates.get((thread, message.get("seq", 0)))
            if gate is not None:
                await gate.hold()
            return self.take(thread, message)

        return deliver

    def deliver_sync(self, thread: str) -> Callable[[Any], bool]:
        def deliver(message: Any) -> bool:
            return self.take(thread, message)

        return deliver


class Gate:
    """Holds the first delivery of one message in flight until :meth:`open` (for
    deterministic interleavings); later deliveries of it pass."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def hold(self) -> None:
        if self.entered.is_set():
            return
        self.entered.set()
        await self.opened.wait()

    def open(self) -> None:
        self.opened.set()


@dataclass
class Sent:
    """One send call made by the test."""

    uid: int
    thread: str
    task: asyncio.Task[bool] | None = None
    result: bool | None = None
    """The return value of an awaited or synchronous send."""
    handed: bool = False
    """A synchronous send made while its thread's line was busy: accepted (True), and its
    records come in its turn, whatever they say."""


class Ledger:
    """Collects a guard's records and checks them against the guard and the sockets."""

    def __init__(self, guard: Guard, sockets: Sockets) -> None:
        self.guard = guard
        self.sockets = sockets
        self.records: list[Emission] = []
        self.sent: list[Sent] = []
        self.bad = 0
        """Sends with bad input made by the test (expected to be REJECTED with seq 0)."""
        self._uids = itertools.count(1)

    @emitguard.hookimpl
    def emitguard_emission(self, emission: Emission, guard: Guard) -> None:
        if guard is self.guard:
            self.records.append(emission)

    def new(self, thread: str, event_type: str = "token") -> tuple[Sent, Message]:
        sent = Sent(next(self._uids), thread)
        self.sent.append(sent)
        return sent, {"type": event_type, "uid": sent.uid, "to": thread}

    # -- the checks ---------------------------------------------------------------

    def check(self) -> dict[tuple[str, int], list[Emission]]:
        """Every invariant that holds between two steps; returns the records per emission."""
        stats = self.guard.stats()  # expires what is due first, so read the records after it
        opts = self.guard.options
        by_key: dict[tuple[str, int], list[Emission]] = {}
        bad_rejected = 0
        for record in self.records:
            # 5. every record but DELIVERED says why
            if record.outcome is not Outcome.DELIVERED:
                assert record.reason, record
            if record.seq == 0:
                assert record.outcome is Outcome.REJECTED, f"unsequenced record {record}"
                bad_rejected += 1
                continue
            message = record.message
            assert message["to"] == record.thread_id, record
            assert message["seq"] == record.seq, f"stamp {message['seq']} on {record}"
            by_key.setdefault((record.thread_id, record.seq), []).append(record)
        assert bad_rejected == self.bad

        # 1. life of one emission: BUFFERED at most once and first, one terminal and last
        uid_key: dict[int, tuple[str, int]] = {}
        for key, records in by_key.items():
            outcomes = [record.outcome for record in records]
            uids = {record.message["uid"] for record in records}
            assert len(uids) == 1, f"{key} carries the messages of sends {uids}"
            uid = uids.pop()
            assert uid not in uid_key, f"send {uid} has seqs {uid_key[uid]} and {key}"
            uid_key[uid] = key
            check_life(key, outcomes)
            if outcomes == [Outcome.BUFFERED, Outcome.DROPPED]:  # evicted from the outbox
                assert records[0].event_type not in opts.protect, f"{key}: protected, evicted"

        # 2./3. per thread: what the socket got is what was recorded as reached, in seq
        # order, once each, and it was meant for that thread
        assert not self.sockets.misrouted, self.sockets.misrouted
        for thread in THREADS:
            got = [message["seq"] for message in self.sockets.received[thread]]
            assert all(message["to"] == thread for message in self.sockets.received[thread])
            assert all(a < b for a, b in itertools.pairwise(got)), f"{thread} received {got}"
            reached = [
                record.seq
                for record in self.records
                if record.thread_id == thread and record.outcome in REACHED
            ]
            assert got == reached, f"{thread}: socket got {got}, records say {reached}"

        # 6. the guard's counters match the records
        counted = Counter(record.outcome for record in self.records)
        assert {o: stats.outcomes.get(o, 0) for o in Outcome} == {o: counted[o] for o in Outcome}

        # 4. what is buffered by the records is what the guard counts and the outbox holds
        buffered = {key for key, records in by_key.items() if not records[-1].outcome.terminal}
        assert dict(stats.pending) == dict(Counter(thread for thread, _ in buffered))
        assert stats.pending_total == len(buffered)
        assert stats.pending_total <= opts.max_total  # bounds (DESIGN section 6)
        assert all(count <= opts.max_per_thread for count in stats.pending.values())
        in_outbox = {
            (entry.thread_id, entry.seq)
            for thread in THREADS
            for entry in drive(self.guard.outbox.entries(thread))
        }
        assert in_outbox == buffered

        # 4./7. every send: recorded, or still in flight; a finished one returned what its
        # first record says
        in_flight = 0
        handed: Counter[str] = Counter()  # synchronous sends waiting their turn in line
        cancelled: Counter[str] = Counter()
        for sent in self.sent:
            key = uid_key.get(sent.uid)
            task = sent.task
            if key is None:
                if task is None:
                    assert sent.result is True, f"send {sent.uid} returned {sent.result} unrecorded"
                    handed[sent.thread] += 1
                else:
                    assert not task.done() or task.cancelled(), f"send {sent.uid} unrecorded"
                    cancelled[sent.thread] += task.cancelled()
                in_flight += 1
                continue
            assert key[0] == sent.thread
            if task is not None and task.done() and not task.cancelled():
                assert task.exception() is None, f"send {sent.uid} raised {task.exception()!r}"
                sent.result = task.result()
            if sent.result is not None and not sent.handed:
                first = by_key[key][0].outcome
                assert sent.result is (first in FIRST_OK), (
                    f"send {sent.uid} returned {sent.result}, first record {first.name}"
                )
        for thread in THREADS:  # handed over, not recorded yet: the guard says it has them
            waiting = stats.waiting.get(thread, 0)
            assert handed[thread] <= waiting <= handed[thread] + cancelled[thread], thread
        terminal = len(by_key) - len(buffered)
        started = len(self.sent) + self.bad
        assert started == bad_rejected + terminal + len(buffered) + in_flight

        # seq is per thread in call order (DESIGN section 2)
        for thread in THREADS:
            seqs = [
                uid_key[sent.uid][1]
                for sent in self.sent
                if sent.thread == thread and sent.uid in uid_key
            ]
            assert all(a < b for a, b in itertools.pairwise(seqs)), (
                f"{thread}: seqs in call order {seqs}"
            )
        return by_key

    def check_settled(self) -> dict[tuple[str, int], list[Emission]]:
        """After a full drain with every thread connected: every emission ended."""
        by_key = self.check()
        stuck = [sent.uid for sent in self.sent if sent.task is not None and not sent.task.done()]
        assert not stuck, f"sends {stuck} never finished"
        assert self.guard.stats().pending_total == 0
        unended = [key for key, records in by_key.items() if not records[-1].outcome.terminal]
        assert not unended, f"still buffered after a full drain: {unended}"
        assert len(by_key) == len(self.sent), (
            f"{len(self.sent)} sends, {len(by_key)} emissions recorded"
        )
        for thread in THREADS:
            count = sum(1 for sent in self.sent if sent.thread == thread)
            seqs = sorted(seq for t, seq in by_key if t == thread)
            assert seqs == list(range(1, count + 1)), f"{thread}: seqs {seqs}, {count} sends"
        return by_key


def check_life(key: tuple[str, int], outcomes: list[Outcome]) -> None:
    """Records of one emission: ``[terminal]``, ``[BUFFERED]`` or ``[BUFFERED, terminal]``."""
    assert 1 <= len(outcomes) <= 2, f"{key}: {[o.name for o in outcomes]}"
    if len(outcomes) == 2:
        assert outcomes[0] is Outcome.BUFFERED, f"{key}: {[o.name for o in outcomes]}"
        assert outcomes[1] in AFTER_BUFFERED, f"{key}: {[o.name for o in outcomes]}"
    else:
        assert outcomes[0] not in {Outcome.FLUSHED, Outcome.EXPIRED}, f"{key}: {outcomes}"


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
        bad_thread: Any = {"t1": "", "t2": 7}.get(thread, thread)
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
        left = self.run(self.g.drain(timeout=0.02))
        assert left >= self.g.stats().pending_total  # stats() may expire more

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
