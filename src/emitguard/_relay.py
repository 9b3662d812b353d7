"""The relay: a guard's sends and deliveries through a shared log (the Redis backend).

With a shared backend every emission goes through the thread's log, wherever it was made:

- **Sending** (any process): the send appends the message (the log gives it its seq) and
  returns True once the log holds it. Sends of one thread are appended in call order, one at
  a time. While the log is unreachable they wait in a bounded local buffer, in order and
  without a seq, retried with backoff; each carries an emission id, so an append retried after
  a timeout that did land is not added twice. A send that waited ``outage_ttl`` is EXPIRED,
  one that finds the local buffer full is DROPPED: recorded, never silent.
- **Delivering** (the processes holding a connection of the thread): each keeps a cursor per
  thread and hands every entry after it to its own send, in seq order, once. It learns of new
  entries from pub/sub notices, and reads the log on every notice, on a poll, and after its
  pub/sub connection comes back, so a lost notice only delays. An entry's terminal record is
  made by whichever process moves the log's delivered mark past it (one that handed it over,
  or one a client resumed on and got it from the replay), once the mark has moved: one per
  entry.

Entries hold data only. The send that delivers is the guard's ``deliver(thread_id, message)``
when it was given one, else the last send this process saw for the thread, rebound to the
stored message; every entry is also handed to the thread's subscriptions in this process
(``fan``: the ThreadHub's sockets, SSE streams), and one they took counts as delivered. With
``stamp_seq`` a dict message gets its seq and its epoch (key ``epoch``): a client's cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from emitguard._history import Replay
from emitguard._loops import alive, running_loop
from emitguard._recorder import Recorder
from emitguard.calls import Call, Verdict, judge, judge_error
from emitguard.options import GuardOptions, stamped
from emitguard.records import Emission
from emitguard.redis_outbox import RedisOutbox, Stored, worker_id
from emitguard.states import Outcome

__all__ = ["Relay"]

log = logging.getLogger("emitguard")

Deliver = Callable[[str, Any], Any]
"""``deliver(thread_id, message)``: the manager's own send, for entries read from the log."""
Fan = Callable[[str, int, str, Any], bool]
"""``fan(thread_id, seq, epoch, message)``: hand an entry to the thread's subscriptions here;
True when one took it."""

_BATCH = 100
_LISTEN = 0.1
"""Seconds the listener waits for a notice before it looks at what it should follow."""
_UNFOLLOWED = 0.01
"""Seconds between reads of a thread's log in its delivery's first second, until the listener
follows its notices (later, as after a reconnect of the listener, the poll; the listener wakes
each delivery once it follows the thread again)."""


class _Item:
    """A send waiting, in order, for the log to take it (no seq yet)."""

    __slots__ = ("created_at", "emission", "future", "message", "thread_id", "waiting")

    def __init__(self, thread_id: str, message: Any) -> None:
        self.thread_id = thread_id
        self.message = message
        self.created_at = time.time()
        self.emission = uuid.uuid4().hex
        self.future: asyncio.Future[Emission] | None = None
        self.waiting = False
        """Its sender awaits its record (else the relay notes the record itself)."""


class _Here:
    """A thread with a connection in this process: where its delivery stands."""

    __slots__ = (
        "begun",
        "cursor",
        "epoch",
        "pending",
        "settling",
        "since",
        "task",
        "thread_id",
        "wake",
    )

    def __init__(self, thread_id: str) -> None:
        self.thread_id = thread_id
        self.epoch: str | None = None
        self.cursor = 0
        self.pending: list[Emission] = []
        """Records of entries handed over here, noted once the log's delivered mark says no
        other process recorded them (:meth:`Relay._settle_handed`)."""
        self.settling = asyncio.Lock()
        """One settle at a time: a later one must not move the mark past an earlier one's
        records before it has read the mark."""
        self.since = time.monotonic()
        self.begun = asyncio.Event()
        """Set once the delivery has its cursor and has recorded what a replay here gave the
        client (``drain`` waits for it)."""
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Relay:
    """Sends and deliveries of one guard through a :class:`RedisOutbox`."""

    owner_ttl = 10.0
    """Seconds the presence of a thread's connection lasts without a heartbeat."""
    poll = 1.0
    """Seconds between reads of a thread's log when no notice came."""

    def __init__(
        self,
        shared: RedisOutbox,
        recorder: Recorder,
        options: GuardOptions,
        deliver: Deliver | None,
        home: Callable[[], asyncio.AbstractEventLoop | None],
        fan: Fan | None = None,
    ) -> None:
        self.shared = shared
        self._fan = fan
        self.worker = worker_id()
        self._recorder = recorder
        self._options = options
        self._deliver = deliver
        self._home = home
        self._stamp = options.stamp_seq
        self._errors = shared.errors()
        self._queues: dict[str, deque[_Item]] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._inline: set[str] = set()
        self.local = 0
        """Sends waiting in the local buffer."""
        self.down_since: float | None = None
        """``time.monotonic()`` when Redis stopped answering; ``None`` while it answers."""
        self._here: dict[str, _Here] = {}
        self._calls: dict[str, Call] = {}
        self._replayed: dict[str, tuple[str | None, int]] = {}
        self._pubsub: Any = None
        self._following: set[str] = set()
        """The notice channels ``_pubsub`` is subscribed to (only the listener changes it)."""
        self._refollow = False
        """The threads delivered here changed: the listener subscribes and unsubscribes."""
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping: set[asyncio.Task[Any]] = set()
        """Deliveries of threads that left, and settles of handed-over records, still
        running (``drain`` waits for them)."""
        self.closed = False

    # ------------------------------------------------------------------ sending

    async def send(self, thread_id: str, message: Any, call: Call) -> bool:
        """Append one emission to the thread's log (the caller checked the thread id)."""
        recorder = self._recorder
        cannot = self.shared.check(message)
        if cannot is not None:
            return recorder.conclude(recorder.make(Outcome.REJECTED, thread_id, 0, message, cannot))
        if self._deliver is None:
            self._calls[thread_id] = call
        if self.local >= self.shared.max_local:
            why = f"redis unavailable and the local buffer is full (max_local={self.local})"
            return recorder.conclude(recorder.make(Outcome.DROPPED, thread_id, 0, message, why))
        item = _Item(thread_id, message)
        queue = self._queues.get(thread_id)
        if queue is None and self.down_since is None:
            return await self._append_now(item)
        if queue is None:
            queue = self._queues[thread_id] = deque()
        queue.append(item)
        self.local += 1
        self._pump(thread_id)
        return await self._acknowledged(item)

    async def _append_now(self, item: _Item) -> bool:
        """Nothing of the thread waits here: append in the sender's own coroutine (later
        sends of the thread queue behind it meanwhile)."""
        thread_id = item.thread_id
        queue = self._queues[thread_id] = deque()
        self._inline.add(thread_id)
        try:
            epoch, seq, _ = await self.shared.append(
                thread_id, item.message, item.created_at, item.emission
            )
        except BaseException as exc:
            self._inline.discard(thread_id)
            queue.appendleft(item)  # kept first: the pump appends it (idempotently) in order
            self.local += 1
            if isinstance(exc, self._errors):
                self._went_down(exc)
                self._pump(thread_id)
                return await self._acknowledged(item)
            self._pump(thread_id)
            raise
        self._inline.discard(thread_id)
        self._came_back()
        if queue:
            self._pump(thread_id)
        elif self._queues.get(thread_id) is queue:
            del self._queues[thread_id]
        return self._recorder.conclude(self._appended(item, epoch, seq))

    async def _acknowledged(self, item: _Item) -> bool:
        """Wait a little for the log to take a queued send; past that it is accepted into the
        local buffer (recorded BUFFERED without a seq) and the relay records the rest."""
        loop = asyncio.get_running_loop()
        future = item.future = loop.create_future()
        item.waiting = True
        try:
            record = await asyncio.wait_for(asyncio.shield(future), self.shared.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            item.waiting = False
            if not future.done():
                why = (
                    "redis unavailable: kept in order in the local buffer, no seq yet "
                    f"(EXPIRED after outage_ttl={self.shared.outage_ttl}s)"
                )
                made = self._recorder.make(
                    Outcome.BUFFERED,
                    item.thread_id,
                    0,
                    item.message,
                    why,
                    created_at=item.created_at,
                )
                return self._recorder.conclude(made)
            record = future.result()
        except asyncio.CancelledError:
            item.waiting = False  # the event stays queued; its records are noted later
            raise
        return self._recorder.conclude(record)

    def _pump(self, thread_id: str) -> None:
        if thread_id in self._pumps or thread_id in self._inline or self.closed:
            return
        task = asyncio.get_running_loop().create_task(self._pumping(thread_id))
        self._pumps[thread_id] = task

    async def _pumping(self, thread_id: str) -> None:
        """Append the thread's queued sends in order, retrying while Redis is down."""
        queue = self._queues[thread_id]
        failures = 0
        try:
            while queue and not self.closed:
                self._expire(queue)
                if not queue:
                    break
                item = queue[0]
                try:
                    epoch, seq, _ = await self.shared.append(
                        thread_id, item.message, item.created_at, item.emission
                    )
                except self._errors as exc:
                    self._went_down(exc)
                    failures += 1
                    await asyncio.sleep(_backoff(failures))
                    continue
                failures = 0
                self._came_back()
                queue.popleft()
                self.local -= 1
                self._settle(item, self._appended(item, epoch, seq))
        finally:
            del self._pumps[thread_id]
            if not queue and self._queues.get(thread_id) is queue:
                del self._queues[thread_id]

    def _expire(self, queue: deque[_Item]) -> None:
        limit = self.shared.outage_ttl
        cutoff = time.time() - limit
        while queue and queue[0].created_at < cutoff:
            item = queue.popleft()
            self.local -= 1
            why = f"redis unavailable for longer than outage_ttl={limit}s: never given a seq"
            self._settle(item, self._made(item, Outcome.EXPIRED, why))

    def _settle(self, item: _Item, record: Emission) -> None:
        future = item.future
        if item.waiting and future is not None and not future.done():
            future.set_result(record)
        else:
            self._recorder.note(record)

    def _appended(self, item: _Item, epoch: str, seq: int) -> Emission:
        return self._recorder.make(
            Outcome.BUFFERED,
            item.thread_id,
            seq,
            item.message,
            f"in the shared log (redis) as seq {seq} of epoch {epoch}",
            created_at=item.created_at,
        )

    def _made(self, item: _Item, outcome: Outcome, why: str) -> Emission:
        return self._recorder.make(
            outcome, item.thread_id, 0, item.message, why, created_at=item.created_at
        )

    def _went_down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "emitguard: redis unavailable (%s: %s); sends wait locally, in order",
                type(exc).__name__,
                exc,
            )

    def _came_back(self) -> None:
        if self.down_since is not None:
            log.warning("emitguard: redis is back after %.1fs", time.monotonic() - self.down_since)
            self.down_since = None

    # --------------------------------------------------------------- delivering

    def associate(self, thread_id: str) -> None:
        """A connection of the thread is here now: deliver its log to it."""
        if thread_id in self._here or self.closed:
            return
        here = self._here[thread_id] = _Here(thread_id)
        self._refollow = True

        def start() -> None:
            if self._here.get(thread_id) is here and not self.closed:
                here.task = self._spawn(self._delivering(here))

        self._soon(start)

    def dissociate(self, thread_id: str) -> None:
        """The thread has no connection here any more."""
        here = self._here.pop(thread_id, None)
        if here is None:
            return
        self._refollow = True

        def stop() -> None:
            if here.task is not None:
                here.task.cancel()  # (it settles what it handed over as it ends: drain waits)
                self._stopping.add(here.task)
                here.task.add_done_callback(self._stopping.discard)
            if thread_id in self._replayed and not self.closed:  # its delivery never began
                settle = self._spawn(self._unconsumed_replay(here))
                self._stopping.add(settle)
                settle.add_done_callback(self._stopping.discard)
            if not self.closed:
                self._spawn(self._left(thread_id))

        self._soon(stop)

    def _soon(self, fn: Callable[[], None]) -> None:
        loop = running_loop()
        if loop is not None:
            fn()
            return
        home = self._home()
        if home is not None and alive(home):
            home.call_soon_threadsafe(fn)
        else:
            log.error("emitguard: no event loop to deliver from redis on; call from async code")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _left(self, thread_id: str) -> None:
        with contextlib.suppress(*self._errors):
            await self.shared.release(thread_id, self.worker)

    async def _delivering(self, here: _Here) -> None:
        """Hand the thread's log to this process's send, from its cursor, in order, once."""
        try:
            await self._deliver_log(here)
        finally:
            here.begun.set()
            if here.pending:  # stopped (left, closed, cancelled) with records to settle
                await self._settled(here)

    async def _deliver_log(self, here: _Here) -> None:
        thread_id, shared = here.thread_id, self.shared
        failures = 0
        self._ensure_background()
        while True:
            if not self._serving(here):
                return
            try:
                await shared.claim([thread_id], self.worker, self.owner_ttl)
                here.epoch, _, delivered = await shared.position(thread_id)
                break
            except self._errors as exc:
                self._went_down(exc)
                failures += 1
                await asyncio.sleep(_backoff(failures))
        here.cursor = delivered
        replayed = self._replayed.pop(thread_id, None)
        if replayed is not None and replayed[0] == here.epoch and replayed[1] > delivered:
            await self._replayed_here(here, replayed[1])
            await self._settled(here)
        here.begun.set()
        failures = 0
        # (checked on every round as well as cancelled: on Python 3.11, asyncio.wait_for loses
        # a cancellation that comes as the event it waits for is set, and close() then waited
        # for this task forever)
        while self._serving(here):
            here.wake.clear()
            try:
                epoch, rows = await shared.read(thread_id, here.cursor, _BATCH)
            except self._errors as exc:
                self._went_down(exc)
                failures += 1
                await asyncio.sleep(_backoff(failures))
                continue
            failures = 0
            if epoch is not None and epoch != here.epoch:
                if here.epoch is not None:
                    log.warning(
                        "emitguard: %s lost its history (epoch %s -> %s): delivery "
                        "starts over at seq 1",
                        thread_id,
                        here.epoch,
                        epoch,
                    )
                    here.cursor = 0
                    epoch, rows = await shared.read(thread_id, 0, _BATCH)
                here.epoch = epoch
            start = here.cursor
            for stored in rows:
                if not await self._hand(here, stored):
                    break
            await self._settled(here)
            if len(rows) == _BATCH and here.cursor > start:
                continue
            # read the log every few ms until the listener follows the thread's notices, in
            # the delivery's first second only (many threads must not poll at that rate)
            eager = (
                shared.channel(thread_id) not in self._following
                and time.monotonic() - here.since < 1.0
            )
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(here.wake.wait(), _UNFOLLOWED if eager else self.poll)

    def _serving(self, here: _Here) -> bool:
        """Whether ``here`` still delivers: the relay is open and the thread still here."""
        return not self.closed and self._here.get(here.thread_id) is here

    async def _unconsumed_replay(self, here: _Here) -> None:
        """The connection a client resumed on went before the thread's delivery here began
        (a task cancelled before its first step runs nothing): what the client got from the
        replay still gets its records (:meth:`_replayed_here`)."""
        thread_id = here.thread_id
        replayed = self._replayed.get(thread_id)
        if replayed is None or thread_id in self._here:  # (a new delivery will take it)
            return
        del self._replayed[thread_id]
        try:
            epoch, _, delivered = await self.shared.position(thread_id)
        except self._errors as exc:
            self._went_down(exc)
            return
        if epoch is None or epoch != replayed[0] or replayed[1] <= delivered:
            return
        here.epoch, here.cursor = epoch, delivered
        await self._replayed_here(here, replayed[1])
        await self._settled(here)

    async def _replayed_here(self, here: _Here, upto: int) -> None:
        """A client resuming here got the log up to ``upto`` from the replay: the entries no
        process had delivered yet (after ``here.cursor``) are recorded FLUSHED here, so that
        each still ends in one record, and delivery goes on after them."""
        thread_id, shared = here.thread_id, self.shared
        while here.cursor < upto:
            try:
                epoch, rows = await shared.read(thread_id, here.cursor, _BATCH)
            except self._errors as exc:
                self._went_down(exc)
                break
            if epoch != here.epoch or not rows:
                break
            for stored in rows:
                if stored.seq > upto:
                    break
                here.pending.append(
                    self._replayed_record(
                        thread_id, here.epoch, stored.seq, stored.message, stored.created_at
                    )
                )
                here.cursor = stored.seq
            else:
                continue
            break
        here.cursor = max(here.cursor, upto)

    def _replayed_record(
        self,
        thread_id: str,
        epoch: str | None,
        seq: int,
        message: Any,
        created_at: float | None = None,
    ) -> Emission:
        """The FLUSHED record of an entry a client resuming here got from the replay."""
        return self._recorder.make(
            Outcome.FLUSHED,
            thread_id,
            seq,
            stamped(self._stamp, message, seq, epoch or ""),
            "replayed from the shared log to the client resuming here",
            created_at=created_at,
        )

    async def _hand(self, here: _Here, stored: Stored) -> bool:
        """Deliver one entry with retries; False when it is still not delivered."""
        thread_id, seq = here.thread_id, stored.seq
        if seq > here.cursor + 1:
            why = f"seq {here.cursor + 1}..{seq - 1} left the log (maxlen) before delivery"
            log.warning("emitguard: %s %s", thread_id, why)
            self._recorder.note(
                self._recorder.make(Outcome.DROPPED, thread_id, here.cursor + 1, None, why)
            )
        message = stored.message
        epoch = here.epoch or ""
        message = stamped(self._stamp, message, seq, epoch)
        backoff = self._options.retry_backoff
        attempts = 0
        while True:
            attempts += 1
            verdict, failure = await self._attempt(thread_id, seq, epoch, message)
            if verdict is not Verdict.RETRY:
                break
            if attempts == 1:
                # What this batch delivered so far is settled at once, not after the retries:
                # a client resuming elsewhere meanwhile must find the log's mark past it.
                await self._settled(here)
            if attempts > len(backoff):
                log.warning("emitguard: %s seq %d: %s; kept in the log", thread_id, seq, failure)
                return False
            await asyncio.sleep(backoff[attempts - 1])
        outcome = Outcome.FLUSHED if verdict is Verdict.OK else Outcome.FAILED
        reason = failure or f"delivered from the shared log on attempt {attempts}"
        record = self._recorder.make(
            outcome,
            thread_id,
            seq,
            message,
            reason,
            attempts=attempts,
            created_at=stored.created_at,
        )
        here.pending.append(record)
        here.cursor = seq
        return True

    async def _settled(self, here: _Here) -> None:
        """:meth:`_settle_handed`, carried through if the delivery is cancelled meanwhile
        (the thread left): cancelled between its advance of the log's mark and its records,
        the mark would say they were made elsewhere. ``drain`` waits for it."""
        task = asyncio.ensure_future(self._settle_handed(here))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        await asyncio.shield(task)

    async def _settle_handed(self, here: _Here) -> None:
        """Move the log's delivered mark past the entries handed over here, and note the
        records of those no other process had recorded: a worker that resumed a client
        recorded what it replayed and moved the mark (one record per entry, whichever
        process makes it). The records are taken off ``here.pending`` first, so two settles
        never weigh the same record; while the log cannot be reached they go back for the
        next try; a log in another epoch or gone: they are noted as they are."""
        async with here.settling:
            await self._settle_now(here)

    async def _settle_now(self, here: _Here) -> None:
        if not here.pending:
            return
        pending, here.pending = here.pending, []
        seen: int | None = None
        if here.epoch is not None:
            try:
                seen = await self.shared.advance(here.thread_id, here.epoch, pending[-1].seq)
            except self._errors as exc:
                if self._serving(here):
                    self._went_down(exc)
                    here.pending[:0] = pending
                    return
        for record in pending:
            if seen is None or record.seq > seen:
                self._recorder.note(record)

    async def _attempt(
        self, thread_id: str, seq: int, epoch: str, message: Any
    ) -> tuple[Verdict, str | None]:
        verdict, failure = await self._call(thread_id, message)
        fan = self._fan
        if verdict is Verdict.POISON or fan is None:
            return verdict, failure
        if fan(thread_id, seq, epoch, message):
            return Verdict.OK, None
        return verdict, failure

    async def _call(self, thread_id: str, message: Any) -> tuple[Verdict, str | None]:
        try:
            if self._deliver is not None:
                result = self._deliver(thread_id, message)
            else:
                call = self._calls.get(thread_id)
                if call is None:
                    return Verdict.RETRY, "no send to deliver it with in this process yet"
                result = call(message)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            return judge_error(exc, self._options.poison)
        return judge(result)

    # ------------------------------------------------------------- background

    def _ensure_background(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = self._spawn(self._listening())
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = self._spawn(self._beating())

    async def _listening(self) -> None:
        """The one user of the pub/sub connection: it follows the notices of the threads
        delivered here and wakes a thread's delivery on each notice, and once it follows the
        thread (the delivery then reads the log: what was appended before is not missed).
        After a reconnect it follows every thread anew and wakes every delivery.

        No other task touches the connection: a subscribe from a delivery could write to a
        connection Redis had closed, or reopen one the listener had just let go, which then
        belonged to no one (redis-py's pool holds a connection in use only weakly: it was
        collected open, an "unclosed Connection" ResourceWarning after a Redis restart)."""
        failures = 0
        while not self.closed:
            try:
                if self._pubsub is None:
                    self._pubsub = self.shared.client.pubsub()
                    self._following = set()
                    self._refollow = True
                if self._refollow:
                    await self._follow(self._pubsub)
                if not self._following:
                    await asyncio.sleep(_LISTEN)
                    continue
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=_LISTEN
                )
                failures = 0
                if message is not None and message.get("type") == "message":
                    woken = self._here.get(self.shared.thread_of(message["channel"]))
                    if woken is not None:
                        woken.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "emitguard: redis notices interrupted (%s: %s); reconnecting",
                        type(exc).__name__,
                        exc,
                    )
                if self._pubsub is not None:
                    with contextlib.suppress(Exception):
                        await self._pubsub.aclose()
                    self._pubsub = None  # (after closing it: close() closes it if cancelled)
                await asyncio.sleep(_backoff(failures))

    async def _follow(self, pubsub: Any) -> None:
        """Subscribe to the notices of the threads delivered here, unsubscribe the others,
        and wake the deliveries of the threads newly followed."""
        self._refollow = False
        channels = {self.shared.channel(thread_id): thread_id for thread_id in self._here}
        new = channels.keys() - self._following
        gone = self._following - channels.keys()
        if new:
            await pubsub.subscribe(*new)
            self._following |= new
            for channel in new:
                here = self._here.get(channels[channel])
                if here is not None:
                    here.wake.set()
        if gone:
            await pubsub.unsubscribe(*gone)
            self._following -= gone

    async def _beating(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.owner_ttl / 3)
            with contextlib.suppress(*self._errors):
                await self.shared.claim(list(self._here), self.worker, self.owner_ttl)

    # ------------------------------------------------------------------ queries

    async def replay(self, thread_id: str, after: int, epoch: str | None, peek: bool) -> Replay:
        found = await self.shared.replay(thread_id, after, epoch)
        return self._replayed_to(thread_id, found, peek)

    def replay_sync(self, thread_id: str, after: int, epoch: str | None, peek: bool) -> Replay:
        found = self.shared.replay_sync(thread_id, after, epoch)
        return self._replayed_to(thread_id, found, peek)

    def _replayed_to(self, thread_id: str, found: Replay, peek: bool) -> Replay:
        """The replay's messages stamped as live ones are; and, unless it was only a look
        (``peek``), a delivery that starts here next starts after what it handed over (one
        already running goes on from its cursor: its readers skip what they replayed)."""
        if not peek and thread_id not in self._here:
            self._replayed[thread_id] = (found.epoch, found.latest)
        if self._stamp is None or not found.messages:
            return found
        epoch = found.epoch or ""
        messages = [
            (seq, stamped(self._stamp, message, seq, epoch)) for seq, message in found.messages
        ]
        return dataclasses.replace(found, messages=messages)

    async def wait_ready(self, thread_id: str, timeout: float) -> bool:
        """Wait until a connection of the thread is held by any process."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(*self._errors):
                if await self.shared.owner(thread_id) is not None:
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))

    def pending(self) -> dict[str, int]:
        """Sends waiting in the local buffer, per thread."""
        return {name: len(queue) for name, queue in self._queues.items() if queue}

    def describe(self) -> dict[str, Any]:
        """The backend's state for :meth:`Guard.stats`."""
        down = self.down_since
        return {
            "backend": "redis",
            "redis": "up" if down is None else "down",
            "down_for": 0.0 if down is None else round(time.monotonic() - down, 3),
            "local": self.local,
            "delivering": len(self._here),
            "worker": self.worker,
        }

    async def drain(self, timeout: float) -> int:
        """Wait until the local buffer is empty (or ``timeout``); how many sends are left."""
        deadline = time.monotonic() + timeout
        pumps = list(self._pumps.values())
        if pumps:
            await asyncio.wait(pumps, timeout=max(deadline - time.monotonic(), 0))
        for here in list(self._here.values()):  # what was handed over here gets its record
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(here.begun.wait(), max(deadline - time.monotonic(), 0))
            await self._settled(here)
        if self._stopping:
            await asyncio.wait(list(self._stopping), timeout=max(deadline - time.monotonic(), 0))
        return self.local

    async def close(self) -> None:
        """Stop; sends still in the local buffer are recorded DROPPED (Redis never took
        them)."""
        self.closed = True
        tasks = [*self._pumps.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for queue in self._queues.values():
            while queue:
                item = queue.popleft()
                self.local -= 1
                self._settle(
                    item, self._made(item, Outcome.DROPPED, "guard closed before redis took it")
                )
        self._queues.clear()
        here, self._here = list(self._here), {}
        with contextlib.suppress(*self._errors, asyncio.TimeoutError, TimeoutError):
            for thread_id in here:
                await asyncio.wait_for(self.shared.release(thread_id, self.worker), 0.5)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None
            self._following = set()


def _backoff(failures: int) -> float:
    """Seconds before retry number ``failures``: 50 ms doubling to 1 s, with jitter."""
    base: float = min(0.05 * 2 ** min(failures - 1, 5), 1.0)
    return base * (0.5 + random.random() / 2)
