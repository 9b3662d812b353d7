"""The engine: readiness barrier, ordered outbox and recorded outcomes for one process.

A :class:`Guard` knows nothing of web frameworks. Adapters hand it each send as
``(thread_id, message, deliver)``, where ``deliver(message)`` calls the original send, and tell
it when a thread is associated or loses its connection. See ``docs/concepts.md``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from emitguard import hooks
from emitguard._line import ThreadSlot
from emitguard.calls import MISSING, Arg
from emitguard.errors import EmissionError
from emitguard.options import GuardOptions
from emitguard.outbox import MemoryOutbox, Outbox, OutboxEntry, drive
from emitguard.records import Emission, event_type_of
from emitguard.states import ConnectionState, Outcome

__all__ = ["Guard", "GuardStats", "live_guards"]

log = logging.getLogger("emitguard")

AsyncDeliver = Callable[[Any], Awaitable[Any]]
SyncDeliver = Callable[[Any], Any]
Rebind = Callable[[tuple[Any, ...], dict[str, Any], Any], tuple[tuple[Any, ...], dict[str, Any]]]
"""``rebind(args, kwargs, message)``: the call's arguments with ``message`` put in."""
_NO_KWARGS: dict[str, Any] = {}
WraptWrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]
"""The calling convention of a wrapt wrapper: ``(wrapped, instance, args, kwargs)``."""

_CONNECTED = ConnectionState.CONNECTED
_names = itertools.count(1)
_live: weakref.WeakSet[Guard] = weakref.WeakSet()


def live_guards() -> list[Guard]:
    """Every guard constructed in this process that is still alive and not closed."""
    return [guard for guard in list(_live) if not guard.closed]


@dataclass(frozen=True)
class GuardStats:
    """A snapshot of a guard's counters."""

    outcomes: Mapping[Outcome, int]
    """How many records of each outcome the guard has made."""
    pending: Mapping[str, int]
    """Buffered emissions per thread (threads with none are left out)."""
    states: Mapping[str, ConnectionState] = field(default_factory=dict)
    """The state of every thread the guard knows."""

    @property
    def pending_total(self) -> int:
        """Buffered emissions over all threads."""
        return sum(self.pending.values())


class Guard:
    """Guards the sends of one connection manager.

    ``Guard(**options)`` takes the options of :class:`~emitguard.options.GuardOptions`, plus
    ``outbox`` (a backend; default :class:`~emitguard.outbox.MemoryOutbox`) and ``name``.
    Most users get a guard from :func:`emitguard.guard` rather than building one.
    """

    def __init__(self, *, outbox: Outbox | None = None, name: str | None = None, **options: Any):
        self.options = GuardOptions.from_kwargs(options)
        self.name = name or f"guard-{next(_names)}"
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.closed = False
        self._threads: dict[str, ThreadSlot] = {}
        self._owners: dict[object, set[str]] = {}
        self._backlogged: set[ThreadSlot] = set()
        self._counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self._seq_elsewhere = 0
        """Seqs given out by any path but a hot-path delivery that worked."""
        self._total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._stamp = self.options.stamp_seq
        self._strict = self.options.strict
        self._dispatch = hooks._dispatch
        self._plain = True
        """No seq stamping and no listeners: the hot path needs no record."""
        hooks.load_entry_points()
        _live.add(self)
        self.refresh()
        hooks.call_safely("emitguard_guard_created", guard=self)

    def refresh(self) -> None:
        """Re-read whether anyone listens to records (called when plugins change)."""
        self._plain = self._stamp is None and not self._dispatch.listening

    def __repr__(self) -> str:
        return f"<Guard {self.name} threads={len(self._threads)} pending={self._total}>"

    # ------------------------------------------------------------------ sends

    def send(
        self, thread_id: str, message: Any, deliver: AsyncDeliver
    ) -> Coroutine[Any, Any, bool]:
        """Emit ``message`` to ``thread_id`` through ``deliver(message)``, the original async
        send (a coroutine to await).

        The coroutine returns True when the message was delivered or accepted into the outbox,
        False when it was rejected, dropped or failed (in strict mode those raise
        :class:`EmissionError`).
        """
        return self.send_call(thread_id, message, deliver, (message,), _NO_KWARGS, _rebind_only)

    async def send_call(
        self,
        thread_id: str,
        message: Any,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
    ) -> bool:
        """:meth:`send` for adapters: the original is ``fn(*args, **kwargs)``, and
        ``rebind(args, kwargs, message)`` returns the arguments with another message in them
        (for seq stamping and for deliveries from the outbox)."""
        try:
            return await self._send_slow(thread_id, message, _Call(fn, args, kwargs, rebind))
        except EmissionError:
            raise
        except Exception as exc:
            return self._fault(thread_id, message, exc)

    def sender(self, thread: Arg, message: Arg) -> WraptWrapper:
        """A wrapt wrapper ``(wrapped, instance, args, kwargs)`` that guards an async send
        whose thread and message arguments sit at ``thread`` and ``message``.

        This is the hot path: a send to a CONNECTED thread with nothing queued costs one
        dictionary look-up and a few attribute checks on top of the original call.
        """
        threads, guard, send_call = self._threads, self, self.send_call
        t_index, m_index = thread.reach, message.reach
        width = max(t_index, m_index) if t_index < sys.maxsize > m_index else sys.maxsize
        pick_thread, pick_message, rebind = thread.pick, message.pick, message.replace
        pair = 2 if (t_index, m_index) == (0, 1) else -1

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
                thread_id = _given(pick_thread(args, kwargs))
                payload = _given(pick_message(args, kwargs))
            try:
                slot = threads.get(thread_id)
            except TypeError:  # unhashable: rejected below
                slot = None
            if (
                slot is None
                or slot.state is not _CONNECTED
                or slot.busy
                or slot.backlog
                or payload is None
                or not guard._plain
            ):
                return await send_call(thread_id, payload, wrapped, args, kwargs, rebind)
            slot.busy = True
            slot.seq += 1
            try:
                result = await wrapped(*args, **kwargs)
            except asyncio.CancelledError:
                call = _Call(wrapped, args, kwargs, rebind)
                await guard._failed_fast(slot, payload, call, "cancelled during send")
                raise
            except Exception as exc:
                call = _Call(wrapped, args, kwargs, rebind)
                return await guard._failed_fast(slot, payload, call, _raised(exc))
            if not result:
                call = _Call(wrapped, args, kwargs, rebind)
                why = f"send returned {result!r}"
                return await guard._failed_fast(slot, payload, call, why)
            if slot.queue or slot.backlog:
                guard._leave(slot)
            else:
                slot.busy = False
            return True  # counted in stats() from the seq numbers: no counter on the hot path

        return guarded_send

    def sync_sender(self, thread: Arg, message: Arg) -> WraptWrapper:
        """:meth:`sender` for a synchronous send (it never waits on the barrier)."""
        send, rebind = self.send_sync_call, message.replace

        def guarded_send(
            wrapped: Callable[..., Any],
            instance: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> bool:
            thread_id = _given(thread.pick(args, kwargs))
            return send(
                thread_id, _given(message.pick(args, kwargs)), wrapped, args, kwargs, rebind
            )

        return guarded_send

    async def _failed_fast(self, slot: ThreadSlot, message: Any, call: _Call, why: str) -> bool:
        """A hot-path delivery failed: disconnect the thread, buffer the event, leave."""
        self._seq_elsewhere += 1
        try:
            return await self._undelivered(slot, slot.seq, message, call, why)
        except EmissionError:
            raise
        except Exception as exc:
            return self._fault(slot.thread_id, message, exc)
        finally:
            self._leave(slot)

    def send_sync(self, thread_id: str, message: Any, deliver: SyncDeliver) -> bool:
        """Like :meth:`send` for a synchronous original; never waits on the barrier."""
        return self.send_sync_call(
            thread_id, message, deliver, (message,), _NO_KWARGS, _rebind_only
        )

    def send_sync_call(
        self,
        thread_id: str,
        message: Any,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
    ) -> bool:
        """:meth:`send_call` for a synchronous original. A send that cannot be delivered at
        once is buffered (this needs a ``synchronous`` outbox; the memory outbox is one)."""
        try:
            return self._send_sync(thread_id, message, _Call(fn, args, kwargs, rebind))
        except EmissionError:
            raise
        except Exception as exc:
            return self._fault(thread_id, message, exc)

    def _send_sync(self, thread_id: str, message: Any, call: _Call) -> bool:
        created_at = time.time()
        bad = self._bad_input(thread_id, message)
        if bad is not None:
            return self._conclude(self._record(Outcome.REJECTED, _name(thread_id), 0, message, bad))
        if not self.outbox.synchronous:
            reason = f"a synchronous send needs a synchronous outbox; {self.outbox!r} is not"
            return self._conclude(self._record(Outcome.REJECTED, thread_id, 0, message, reason))
        slot = self._slot(thread_id)
        slot.seq = seq = slot.seq + 1
        self._seq_elsewhere += 1
        if self._stamp is not None:
            message = self._stamped(message, seq)
        attempts, reason = 0, self._unready_reason(slot)
        if slot.state is _CONNECTED and not slot.busy and not slot.backlog:
            slot.busy = slot.slow = True
            try:
                result, reason = _attempt_sync(call, message)
            finally:
                slot.busy = slot.slow = False
            if result:
                return self._conclude(
                    self._record(Outcome.DELIVERED, thread_id, seq, message, attempts=1)
                )
            attempts = 1
            self._set_state(slot, ConnectionState.DISCONNECTED, reason)
        entry = self._entry(slot, seq, message, call, False, created_at, attempts)
        accepted: bool = drive(self._buffer(slot, entry, reason))
        if slot.state is _CONNECTED and not slot.busy:
            self._schedule_flush(slot)
        return accepted

    def _fault(self, thread_id: object, message: Any, exc: Exception) -> bool:
        """emitguard's own fault: logged and recorded, never raised (but in strict mode)."""
        log.exception("emitguard internal error while sending to thread %r", thread_id)
        reason = f"emitguard internal error: {type(exc).__name__}: {exc}"
        return self._conclude(self._record(Outcome.FAILED, _name(thread_id), 0, message, reason))

    async def _send_slow(self, thread_id: Any, message: Any, deliver: AsyncDeliver) -> bool:
        created_at = time.time()
        bad = self._bad_input(thread_id, message)
        if bad is not None:
            return self._conclude(self._record(Outcome.REJECTED, _name(thread_id), 0, message, bad))
        slot = self._slot(thread_id)
        self._loop = asyncio.get_running_loop()
        ticket = slot.take()
        if ticket is not None:
            try:
                await asyncio.shield(ticket)
            except asyncio.CancelledError:
                # Keep this emission's place in line: it goes on without its caller.
                self._spawn(self._finish_in_line(slot, ticket, message, deliver, created_at))
                raise
        try:
            return await self._emit_in_line(slot, message, deliver, created_at)
        finally:
            self._leave(slot)

    async def _finish_in_line(
        self,
        slot: ThreadSlot,
        ticket: asyncio.Future[None],
        message: Any,
        deliver: AsyncDeliver,
        created_at: float,
    ) -> None:
        await ticket
        try:
            await self._emit_in_line(slot, message, deliver, created_at)
        except EmissionError:
            pass  # strict mode: the record reached the listeners; there is no caller to raise to
        finally:
            self._leave(slot)

    async def _emit_in_line(
        self, slot: ThreadSlot, message: Any, deliver: AsyncDeliver, created_at: float
    ) -> bool:
        """Deliver or buffer one emission; the caller holds the thread's line."""
        slot.seq = seq = slot.seq + 1
        self._seq_elsewhere += 1
        if self._stamp is not None:
            message = self._stamped(message, seq)
        waited, attempts = 0.0, 0
        opts = self.options
        if (
            slot.state is ConnectionState.CONNECTING
            and opts.on_unready == "wait"
            and not slot.timed_out
            and opts.ready_timeout > 0
        ):
            started = time.monotonic()
            try:
                await self._wait_ready(slot, opts.ready_timeout)
            except asyncio.CancelledError:
                waited = time.monotonic() - started
                entry = self._entry(slot, seq, message, deliver, True, created_at, 0, waited)
                await self._buffer(slot, entry, "sender cancelled while waiting for the thread")
                raise
            waited = time.monotonic() - started
            if _state_of(slot) is ConnectionState.CONNECTING:
                slot.timed_out = True
                reason = f"thread not associated within ready_timeout={opts.ready_timeout}s"
            else:
                reason = self._unready_reason(slot)
        else:
            reason = self._unready_reason(slot)
        if slot.state is _CONNECTED and slot.backlog:
            await self._flush_in_line(slot, upto=seq)
            reason = self._unready_reason(slot)
        if slot.state is _CONNECTED:
            try:
                result = await deliver(message)
            except asyncio.CancelledError:
                entry = self._entry(slot, seq, message, deliver, True, created_at, 1, waited)
                await self._buffer(slot, entry, "cancelled during send")
                raise
            except Exception as exc:
                result, reason = False, _raised(exc)
            else:
                reason = f"send returned {result!r}"
            attempts = 1
            if result:
                return self._conclude(
                    self._record(
                        Outcome.DELIVERED,
                        slot.thread_id,
                        seq,
                        message,
                        waited=waited,
                        attempts=1,
                        created_at=created_at,
                    )
                )
            self._set_state(slot, ConnectionState.DISCONNECTED, reason)
        entry = self._entry(slot, seq, message, deliver, True, created_at, attempts, waited)
        return await self._buffer(slot, entry, reason)

    async def _undelivered(
        self, slot: ThreadSlot, seq: int, message: Any, deliver: AsyncDeliver, why: str
    ) -> bool:
        """A fast-path delivery failed: the thread is disconnected, the event is buffered."""
        self._set_state(slot, ConnectionState.DISCONNECTED, why)
        entry = self._entry(slot, seq, message, deliver, True, time.time(), 1)
        return await self._buffer(slot, entry, why)

    # ------------------------------------------------------------ the outbox

    async def _buffer(self, slot: ThreadSlot, entry: OutboxEntry, reason: str) -> bool:
        """Put an emission into the outbox, applying the bounds; records what happened."""
        cannot = self.outbox.check(entry.message)
        if cannot is not None:
            outcome = Outcome.FAILED if entry.attempts else Outcome.REJECTED
            return self._conclude(self._entry_record(entry, outcome, f"{reason}; {cannot}"))
        opts = self.options
        thread_full = slot.backlog >= opts.max_per_thread
        if thread_full or self._total >= opts.max_total:
            bound = (
                f"max_per_thread={opts.max_per_thread}"
                if thread_full
                else f"max_total={opts.max_total}"
            )
            full = f"outbox full, {bound}"
            if opts.overflow == "reject":
                return self._conclude(self._entry_record(entry, Outcome.REJECTED, full))
            if opts.overflow == "drop_newest" and entry.event_type not in opts.protect:
                return self._conclude(
                    self._entry_record(entry, Outcome.DROPPED, f"{full}, overflow=drop_newest")
                )
            scope = slot.thread_id if thread_full else None
            victim = await self.outbox.evict_oldest(scope, opts.protect)
            if victim is None:
                return self._conclude(
                    self._entry_record(
                        entry, Outcome.DROPPED, f"{full}, every buffered event is protected"
                    )
                )
            self._forget(victim)
            self._note(
                self._entry_record(
                    victim, Outcome.DROPPED, f"{full}, evicted for a newer event ({opts.overflow})"
                )
            )
        entry.buffered = time.monotonic()
        await self.outbox.push(entry)
        slot.backlog += 1
        self._total += 1
        self._backlogged.add(slot)
        self._ensure_sweeper()
        return self._conclude(self._entry_record(entry, Outcome.BUFFERED, reason))

    async def _flush_in_line(self, slot: ThreadSlot, upto: int | None = None) -> None:
        """Deliver the thread's buffered emissions in order (``seq <= upto``); stops at the
        first failure, which disconnects the thread. The caller holds the line."""
        ttl = self.options.ttl
        while slot.state is _CONNECTED and slot.backlog:
            entry = await self.outbox.head(slot.thread_id)
            if entry is None:
                log.error(
                    "outbox %r lost %d event(s) of thread %s",
                    self.outbox,
                    slot.backlog,
                    slot.thread_id,
                )
                self._total -= slot.backlog
                slot.backlog = 0
                break
            if upto is not None and entry.seq > upto:
                break
            if ttl is not None and time.monotonic() - entry.created > ttl:
                await self.outbox.remove(slot.thread_id, entry.seq)
                self._forget(entry)
                self._note(self._entry_record(entry, Outcome.EXPIRED, _expired(ttl)))
                continue
            if entry.deliver is None:
                await self.outbox.remove(slot.thread_id, entry.seq)
                self._forget(entry)
                self._note(self._entry_record(entry, Outcome.FAILED, "no send to deliver it with"))
                continue
            entry.attempts += 1
            if entry.is_async:
                try:
                    result = await entry.deliver(entry.message)
                except Exception as exc:
                    result, why = False, _raised(exc)
                else:
                    why = f"send returned {result!r}"
            else:
                result, why = _attempt_sync(entry.deliver, entry.message)
            if not result:
                self._set_state(slot, ConnectionState.DISCONNECTED, f"flush failed: {why}")
                break
            await self.outbox.remove(slot.thread_id, entry.seq)
            self._forget(entry)
            self._note(self._entry_record(entry, Outcome.FLUSHED))

    def _forget(self, entry: OutboxEntry) -> None:
        """Account for an entry that left the outbox."""
        self._total -= 1
        slot = self._threads.get(entry.thread_id)
        if slot is not None:
            slot.backlog -= 1
            if not slot.backlog:
                self._backlogged.discard(slot)

    async def _flush_task(self, slot: ThreadSlot) -> None:
        try:
            ticket = slot.take()
        except BaseException:
            slot.flush_pending = False
            raise
        try:
            if ticket is not None:
                await ticket
            slot.flush_pending = False
            if slot.state is _CONNECTED:
                await self._flush_in_line(slot)
        finally:
            slot.flush_pending = False
            self._leave(slot)

    def _schedule_flush(self, slot: ThreadSlot) -> None:
        """Start a flush of the thread on an event loop, wherever this was called from."""
        if slot.flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            known = self._loop
            if known is not None and known.is_running() and not known.is_closed():
                known.call_soon_threadsafe(self._schedule_flush, slot)
                return
            # No loop runs here or anywhere we know of: flush to the end in a private loop.
            slot.flush_pending = True
            try:
                asyncio.run(self._flush_task(slot))
            except Exception:
                log.exception("emitguard could not flush thread %s", slot.thread_id)
            return
        slot.flush_pending = True
        self._spawn(self._flush_task(slot))

    def _leave(self, slot: ThreadSlot) -> None:
        """Give up the thread's line; flush what sync sends buffered meanwhile."""
        if slot.hand_on():
            return
        if slot.backlog and slot.state is _CONNECTED:
            self._schedule_flush(slot)

    # ------------------------------------------------------- thread lifecycle

    def mark_connected(self, thread_id: str, owner: object = None) -> None:
        """The thread is associated with a live connection (of ``owner``, if given).

        Wakes every send waiting on the barrier and flushes the outbox before newer sends.
        """
        _check_thread_id(thread_id)
        if self._elsewhere(self.mark_connected, thread_id, owner):
            return
        slot = self._slot(thread_id)
        if owner is not None:
            slot.owners.add(owner)
            self._owners.setdefault(owner, set()).add(thread_id)
        slot.timed_out = False
        self._set_state(slot, _CONNECTED, None)
        slot.wake_ready(True)
        if slot.backlog:
            self._schedule_flush(slot)

    def mark_disconnected(self, thread_id: str, reason: str = "marked disconnected") -> None:
        """The thread has no live connection: sends buffer at once until it is associated."""
        _check_thread_id(thread_id)
        if self._elsewhere(self.mark_disconnected, thread_id, reason):
            return
        slot = self._slot(thread_id)
        for owner in slot.owners:
            self._owners.get(owner, set()).discard(thread_id)
        slot.owners.clear()
        self._set_state(slot, ConnectionState.DISCONNECTED, reason)
        slot.wake_ready(False)

    def mark_error(self, thread_id: str, error: BaseException | str) -> None:
        """The association of the thread raised: sends buffer at once."""
        _check_thread_id(thread_id)
        if self._elsewhere(self.mark_error, thread_id, error):
            return
        slot = self._slot(thread_id)
        note = error if isinstance(error, str) else _raised(error, "association")
        self._set_state(slot, ConnectionState.ERROR, note)
        slot.wake_ready(False)

    def disconnect_owner(self, owner: object, reason: str | None = None) -> list[str]:
        """``owner`` went away: its threads that no other owner carries are disconnected.

        Returns the threads that were disconnected.
        """
        if self._elsewhere(self.disconnect_owner, owner, reason):
            return []
        gone: list[str] = []
        for thread_id in sorted(self._owners.pop(owner, set())):
            slot = self._threads[thread_id]
            slot.owners.discard(owner)
            if not slot.owners and slot.state is _CONNECTED:
                self._set_state(
                    slot, ConnectionState.DISCONNECTED, reason or f"owner {owner!r} disconnected"
                )
                gone.append(thread_id)
        return gone

    def state(self, thread_id: str) -> ConnectionState:
        """The thread's state (``CONNECTING`` for a thread the guard never saw)."""
        slot = self._threads.get(thread_id)
        return slot.state if slot is not None else ConnectionState.CONNECTING

    async def wait_ready(self, thread_id: str, timeout: float | None = None) -> bool:
        """Wait until the thread is associated; False when ``timeout`` (default
        ``ready_timeout``) passes first. Agent executors await this before they start."""
        _check_thread_id(thread_id)
        slot = self._slot(thread_id)
        self._loop = asyncio.get_running_loop()
        if slot.state is _CONNECTED:
            return True
        await self._wait_ready(slot, self.options.ready_timeout if timeout is None else timeout)
        return slot.state is _CONNECTED

    async def _wait_ready(self, slot: ThreadSlot, timeout: float) -> None:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        slot.ready.append(future)
        try:
            await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        finally:
            if future in slot.ready:
                slot.ready.remove(future)

    # ---------------------------------------------------------- maintenance

    def stats(self) -> GuardStats:
        """Counts per outcome, pending per thread and thread states (expiring what is due)."""
        if self.outbox.synchronous:
            drive(self._expire())
        outcomes = dict(self._counts)
        hot_busy = sum(1 for slot in self._threads.values() if slot.busy and not slot.slow)
        issued = sum(slot.seq for slot in self._threads.values())
        outcomes[Outcome.DELIVERED] += issued - self._seq_elsewhere - hot_busy
        pending = {slot.thread_id: slot.backlog for slot in self._backlogged}
        states = {name: slot.state for name, slot in self._threads.items()}
        return GuardStats(outcomes, pending, states)

    async def pending(self, thread_id: str | None = None) -> list[OutboxEntry]:
        """The buffered entries of one thread, or of every thread, oldest first."""
        names = (
            [thread_id] if thread_id is not None else sorted(s.thread_id for s in self._backlogged)
        )
        found: list[OutboxEntry] = []
        for name in names:
            found.extend(await self.outbox.entries(name))
        return found

    async def drain(self, timeout: float = 5.0) -> int:
        """Deliver what can be delivered within ``timeout`` seconds; return how many
        emissions are still buffered (expired ones are recorded and not counted)."""
        deadline = time.monotonic() + timeout
        self._loop = asyncio.get_running_loop()
        while True:
            await self._expire()
            for slot in list(self._backlogged):
                if slot.state is _CONNECTED:
                    self._schedule_flush(slot)
            busy = any(slot.busy for slot in self._threads.values())
            remaining = deadline - time.monotonic()
            if (not self._tasks and not busy) or remaining <= 0:
                return self._total
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=min(remaining, 0.05))
            else:
                await asyncio.sleep(min(remaining, 0.005))

    async def aclose(self) -> None:
        """Stop background work. Buffered emissions stay in the outbox, still BUFFERED."""
        self.closed = True
        tasks = [*self._tasks, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None

    async def _expire(self) -> None:
        ttl = self.options.ttl
        if ttl is None or not self._total:
            return
        cutoff = time.monotonic() - ttl
        for slot in list(self._backlogged):
            if slot.busy:
                continue  # its holder checks expiry before every delivery
            for entry in await self.outbox.expire(slot.thread_id, cutoff):
                self._forget(entry)
                self._note(self._entry_record(entry, Outcome.EXPIRED, _expired(ttl)))

    def _ensure_sweeper(self) -> None:
        if self.options.ttl is None or (self._sweeper is not None and not self._sweeper.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # stats(), drain() and flushes expire lazily
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        assert self.options.ttl is not None
        interval = min(max(self.options.ttl / 4, 0.01), 1.0)
        while self._total:
            await asyncio.sleep(interval)
            await self._expire()

    # --------------------------------------------------------------- helpers

    def _slot(self, thread_id: str) -> ThreadSlot:
        slot = self._threads.get(thread_id)
        if slot is None:
            slot = self._threads[thread_id] = ThreadSlot(thread_id)
        return slot

    def threads(self) -> Iterator[str]:
        """Every thread the guard knows."""
        return iter(list(self._threads))

    def _elsewhere(self, method: Callable[..., Any], *args: Any) -> bool:
        """Called from another OS thread while the guard's loop runs: run it there instead."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return False
        try:
            if asyncio.get_running_loop() is loop:
                return False
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(method, *args)
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_state(self, slot: ThreadSlot, new: ConnectionState, note: str | None) -> None:
        slot.note = note
        old = slot.state
        if old is new:
            return
        slot.state = new
        hooks.call_safely(
            "emitguard_state_changed", guard=self, thread_id=slot.thread_id, old=old, new=new
        )

    def _unready_reason(self, slot: ThreadSlot) -> str:
        state = slot.state
        if state is ConnectionState.CONNECTING:
            if self.options.on_unready == "buffer":
                return "thread not associated yet (on_unready='buffer')"
            if slot.timed_out:
                return "thread not associated; an earlier send already waited ready_timeout"
            return "thread not associated yet"
        if state is _CONNECTED:
            return "queued behind older events of the thread"
        label = "disconnected" if state is ConnectionState.DISCONNECTED else "in error"
        return f"thread {label}: {slot.note}" if slot.note else f"thread {label}"

    def _bad_input(self, thread_id: object, message: object) -> str | None:
        if not isinstance(thread_id, str):
            return (
                f"thread_id must be a non-empty str, got {type(thread_id).__name__} {thread_id!r}"
            )
        if not thread_id:
            return "thread_id must be a non-empty str, got ''"
        if message is None:
            return "message is None"
        return None

    def _stamped(self, message: Any, seq: int) -> Any:
        if isinstance(message, dict):
            return {**message, self._stamp: seq}
        return message

    def _entry(
        self,
        slot: ThreadSlot,
        seq: int,
        message: Any,
        deliver: Callable[[Any], Any],
        is_async: bool,
        created_at: float,
        attempts: int,
        waited: float = 0.0,
    ) -> OutboxEntry:
        return OutboxEntry(
            thread_id=slot.thread_id,
            seq=seq,
            message=message,
            event_type=event_type_of(message),
            created=time.monotonic() - (time.time() - created_at),
            created_at=created_at,
            deliver=deliver,
            is_async=is_async,
            attempts=attempts,
            waited=waited,
        )

    def _record(
        self,
        outcome: Outcome,
        thread_id: str,
        seq: int,
        message: Any,
        reason: str | None = None,
        *,
        waited: float = 0.0,
        attempts: int = 0,
        created_at: float | None = None,
    ) -> Emission:
        now = time.time()
        return Emission(
            thread_id=thread_id,
            seq=seq,
            event_type=event_type_of(message),
            outcome=outcome,
            reason=reason,
            waited=waited,
            attempts=attempts,
            created_at=now if created_at is None else created_at,
            recorded_at=now,
            guard_name=self.name,
            message=message,
        )

    def _entry_record(
        self, entry: OutboxEntry, outcome: Outcome, reason: str | None = None
    ) -> Emission:
        in_outbox = time.monotonic() - entry.buffered if entry.buffered else 0.0
        return Emission(
            thread_id=entry.thread_id,
            seq=entry.seq,
            event_type=entry.event_type,
            outcome=outcome,
            reason=reason,
            waited=entry.waited,
            buffered_for=in_outbox if outcome is not Outcome.BUFFERED else 0.0,
            attempts=entry.attempts,
            created_at=entry.created_at,
            recorded_at=time.time(),
            guard_name=self.name,
            message=entry.message,
        )

    def _note(self, record: Emission) -> Emission:
        """Count a record and hand it to the listeners."""
        self._counts[record.outcome] += 1
        if self._dispatch.listening:
            hooks.call_safely("emitguard_emission", emission=record, guard=self)
        return record

    def _conclude(self, record: Emission) -> bool:
        """Note the caller's own record; True for a good outcome, else False (or raise)."""
        self._note(record)
        if record.outcome.ok:
            return True
        if self._strict:
            raise EmissionError(record)
        return False


class _Call:
    """A deferred call of the original send with another message: ``call(message)``."""

    __slots__ = ("args", "fn", "kwargs", "rebind")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rebind: Rebind,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.rebind = rebind

    def __call__(self, message: Any) -> Any:
        args, kwargs = self.rebind(self.args, self.kwargs, message)
        return self.fn(*args, **kwargs)


def _rebind_only(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (message,), kwargs


def _given(value: Any) -> Any:
    return None if value is MISSING else value


def _state_of(slot: ThreadSlot) -> ConnectionState:
    """The slot's state, read afresh (keeps type checkers from narrowing across awaits)."""
    return slot.state


def _attempt_sync(deliver: SyncDeliver, message: Any) -> tuple[bool, str]:
    try:
        result = deliver(message)
    except Exception as exc:
        return False, _raised(exc)
    return bool(result), f"send returned {result!r}"


def _raised(exc: BaseException, what: str = "send") -> str:
    return f"{what} raised {type(exc).__name__}: {exc}"


def _expired(ttl: float) -> str:
    return f"expired after ttl={ttl}s in the outbox"


def _name(thread_id: object) -> str:
    return thread_id if isinstance(thread_id, str) else repr(thread_id)


def _check_thread_id(thread_id: object) -> None:
    if not isinstance(thread_id, str) or not thread_id:
        raise ValueError(f"thread_id must be a non-empty str, got {thread_id!r}")
