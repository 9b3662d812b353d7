"""Helpers shared by the tests (a plain module: conftest.py holds fixtures only).

- fake sockets for the engine's own tests (:class:`Sockets`, :class:`Gate`), the records'
  bookkeeping (:class:`Sent`, :class:`Ledger`, :func:`check_life`): used by the invariant and
  the differential state machines;
- a tiny legacy manager (:class:`ThreadManager`, :class:`SyncThreadManager`) whose
  :class:`FakeSocket` s record what they received, for the scenario and load tests.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import emitguard
from emitguard import Emission, Guard, Outcome
from emitguard.outbox import drive

if TYPE_CHECKING:
    pass

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
        self.held: dict[str, tuple[bool, asyncio.Event]] = {}
        """Per thread: every async delivery waits on the event until the test releases it,
        before taking the message (``False``) or after taking it (``True``: the socket has
        the message, the send has not returned yet)."""
        self.failing: dict[str, int] = {}
        """Per thread: how many more deliveries fail once each (a transient fault; the
        socket stays up)."""

    def hold(self, thread: str, *, after_taking: bool = False) -> None:
        """Async deliveries to ``thread`` block until :meth:`release` (see :attr:`held`)."""
        if thread not in self.held:
            self.held[thread] = (after_taking, asyncio.Event())

    def release(self, thread: str) -> None:
        held = self.held.pop(thread, None)
        if held is not None:
            held[1].set()

    def take(self, thread: str, message: Any) -> bool:
        if not isinstance(message, dict) or message.get("to") != thread:
            self.misrouted.append((thread, message))
        if self.failing.get(thread):
            self.failing[thread] -= 1
            raise ConnectionError(f"socket of {thread}: transient fault")
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
            held = self.held.get(thread)
            if held is None:
                return self.take(thread, message)
            after_taking, released = held
            if not after_taking:
                await released.wait()
                return self.take(thread, message)
            taken = self.take(thread, message)
            await released.wait()
            return taken

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


class FakeSocket:
    """One client connection: records every message it accepted, in order.

    ``fail_next``: that many sends raise :class:`ConnectionError` (a transient fault: the
    socket stays open). ``slow``: the next send sleeps that long, before taking the message
    or, with ``slow_after_taking``, after taking it; a send cancelled in that sleep after
    taking the message is counted in :attr:`cancelled_after_taking` (the at-least-once case:
    the guard may hand the message over again).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[Any] = []
        self.closed = False
        self.fail_next = 0
        self.slow = 0.0
        self.slow_after_taking = False
        self.cancelled_after_taking: list[Any] = []

    def __repr__(self) -> str:
        return f"FakeSocket({self.name!r}, received={len(self.received)}, closed={self.closed})"

    def close(self) -> None:
        self.closed = True

    def send_nowait(self, message: Any) -> None:
        if self.closed:
            raise ConnectionError(f"socket {self.name} is closed")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError(f"socket {self.name}: transient fault")
        self.received.append(message)

    async def send(self, message: Any) -> None:
        delay, self.slow = self.slow, 0.0
        if not delay:
            self.send_nowait(message)
        elif not self.slow_after_taking:
            await asyncio.sleep(delay)
            self.send_nowait(message)
        else:
            self.send_nowait(message)
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.cancelled_after_taking.append(message)
                raise


class ThreadManager:
    """A legacy connection manager in miniature: sockets per user, and per thread the list
    of sockets tied to it (``threads``). The association is synchronous, the send async and
    returns False when no socket took the message; a send that finds a closed socket drops
    it (the manager learns of a dead connection only then)."""

    def __init__(self) -> None:
        self.users: dict[str, list[FakeSocket]] = {}
        self.threads: dict[str, list[FakeSocket]] = {}
        self.sockets: dict[str, list[FakeSocket]] = {}
        """Every socket ever tied to each thread, in the order they were tied (what the
        thread's client received is their ``received`` lists, one after the other)."""
        self._names = itertools.count(1)

    def connect(self, user_id: str) -> FakeSocket:
        socket = FakeSocket(f"{user_id}#{next(self._names)}")
        self.users.setdefault(user_id, []).append(socket)
        return socket

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        live = [socket for socket in self.users.get(user_id, ()) if not socket.closed]
        if not live:
            return False
        tied = self.threads.setdefault(thread_id, [])
        ever = self.sockets.setdefault(thread_id, [])
        for socket in live:
            if socket not in tied:
                tied.append(socket)
            if socket not in ever:
                ever.append(socket)
        return True

    def disconnect_user(self, user_id: str) -> None:
        for socket in self.users.pop(user_id, ()):
            socket.close()
            self._forget(socket)

    def _forget(self, socket: FakeSocket) -> None:
        for tied in self.threads.values():
            if socket in tied:
                tied.remove(socket)

    def _targets(self, thread_id: str) -> list[FakeSocket]:
        return list(self.threads.get(thread_id, ()))

    def _failed(self, socket: FakeSocket) -> None:
        if socket.closed:
            self._forget(socket)

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        delivered = False
        for socket in self._targets(thread_id):
            try:
                await socket.send(message)
            except ConnectionError:
                self._failed(socket)
            else:
                delivered = True
        return delivered

    def received(self, thread_id: str) -> list[Any]:
        """What the thread's clients received, socket after socket."""
        return [
            message for socket in self.sockets.get(thread_id, ()) for message in socket.received
        ]

    def associated(self, thread_id: str) -> bool:
        """An open socket is tied to the thread."""
        return any(not socket.closed for socket in self.threads.get(thread_id, ()))


class SyncThreadManager(ThreadManager):
    """:class:`ThreadManager` with a synchronous send (a sync manager in a threaded
    server)."""

    def send_to_thread(self, thread_id: str, message: Any) -> bool:  # type: ignore[override]
        delivered = False
        for socket in self._targets(thread_id):
            try:
                socket.send_nowait(message)
            except ConnectionError:
                self._failed(socket)
            else:
                delivered = True
        return delivered
