"""``Guard``: the engine's front, for one connection manager in one process.

A guard knows nothing of web frameworks. Adapters hand it each send (:meth:`Guard.sender`,
:meth:`Guard.send`) and tell it when a thread is associated or loses its connection
(:meth:`Guard.mark_connected`, ...). It holds a few parts with one job each, wired here:

- the thread table (:mod:`emitguard._table`): slots, owners, states, the lines;
- the recorder (:mod:`emitguard._recorder`): records, counts, listeners, strict mode;
- the outbox flow (:mod:`emitguard._flow`): buffering, bounds, flushes, retries, expiry;
- the pipeline (:mod:`emitguard._pipeline`, entered through :mod:`emitguard._senders`);
- telemetry (:mod:`emitguard._telemetry`) and the replay window (:mod:`emitguard._history`).

See ``docs/concepts.md`` (the architecture section draws them).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from emitguard import _live, hooks, transport
from emitguard._delivery import Delivery
from emitguard._flow import Flow
from emitguard._history import Replay, ReplayWindow
from emitguard._ids import id_problem
from emitguard._loops import Signal, running_loop
from emitguard._pipeline import Pipeline
from emitguard._recorder import Recorder
from emitguard._senders import Senders
from emitguard._slot import ThreadSlot
from emitguard._table import ThreadTable
from emitguard._telemetry import Telemetry
from emitguard.backends import from_url
from emitguard.calls import AnyOf, Arg, WraptWrapper, rebind_only
from emitguard.options import GuardOptions
from emitguard.outbox import MemoryOutbox, Outbox, OutboxEntry, drive
from emitguard.states import ConnectionState, Outcome
from emitguard.stats import GuardStats
from emitguard.subscriptions import Subscription

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from emitguard._relay import Relay

__all__ = ["GUARD_ARGUMENTS", "Guard", "live_guards"]

GUARD_ARGUMENTS = ("outbox", "name", "tracer_provider", "meter_provider", "deliver")
"""Arguments of :class:`Guard` that are not :class:`~emitguard.options.GuardOptions`."""

CONNECTED = ConnectionState.CONNECTED

AsyncDeliver = Callable[[Any], Awaitable[Any]]
SyncDeliver = Callable[[Any], Any]
_NO_KWARGS: dict[str, Any] = {}
_numbers = itertools.count(1)
log = logging.getLogger("emitguard")


class Guard:
    """Guards the sends of one connection manager.

    ``Guard(**options)`` takes the options of :class:`~emitguard.options.GuardOptions`, plus
    ``outbox`` (a backend or its URL, ``"memory://"`` or ``"redis://host:6379/0"``; default
    :class:`~emitguard.outbox.MemoryOutbox`), ``name`` (unique by default), the OpenTelemetry
    ``tracer_provider`` and ``meter_provider`` (the global ones by default; see
    ``docs/tracing.md``), and ``deliver``: with a shared backend (Redis), the manager's own
    ``deliver(thread_id, message)`` that hands an entry read from the log to this process's
    connection of the thread (default: the last send this process saw for the thread).
    Most users get a guard from :func:`emitguard.guard` rather than building one.
    ``async with Guard() as guard:`` closes it at the end (:meth:`aclose`).
    """

    def __init__(
        self,
        *,
        outbox: Outbox | str | None = None,
        name: str | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        deliver: Callable[[str, Any], Any] | None = None,
        **options: Any,
    ) -> None:
        self.options = opts = GuardOptions.from_kwargs(options)
        self.name = name or f"guard-{next(_numbers)}"
        if isinstance(outbox, str):
            outbox = from_url(outbox)
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.closed = False
        self._subscribed = 0
        shared = self.outbox.shared  # the log in the backend is the replay window
        self._window = (
            ReplayWindow(opts.history, opts.history_total) if opts.history and not shared else None
        )
        self._tel = Telemetry(
            opts, self.name, lambda: self._flow.total, tracer_provider, meter_provider
        )
        self._table = ThreadTable(
            keep=lambda slot, ticket: self._pipeline.keep(slot, ticket),
            on_state=self._state_changed,
            first_seq=self._window.latest if self._window is not None else None,
            idle_limit=opts.idle_threads,
        )
        self._recorder = Recorder(self, self._tel, self._window, strict=opts.strict)
        self._delivery = Delivery(self._tel, opts.poison, self._adopt, opts.verdict)
        self._flow = Flow(opts, self.outbox, self._table, self._recorder, self._delivery, self._tel)
        self._pipeline = Pipeline(
            opts, self._table, self._recorder, self._flow, self._delivery, self._tel
        )
        self._senders = Senders(self._pipeline, self._table)
        self._relay: Relay | None = None
        if shared:
            from emitguard._relay import Relay
            from emitguard.redis_outbox import RedisOutbox

            if not isinstance(self.outbox, RedisOutbox):
                raise TypeError(f"no relay for the shared backend {self.outbox!r}")
            home = self._flow_home
            relay = Relay(self.outbox, self._recorder, opts, deliver, home, self._fan_shared)
            self._relay = self._pipeline.relay = relay
        hooks.load_entry_points()
        _live.add(self)
        self.refresh()
        hooks.call_safely("emitguard_guard_created", guard=self)

    def _flow_home(self) -> asyncio.AbstractEventLoop | None:
        return self._flow.home

    def _fan_shared(self, thread_id: str, seq: int, epoch: str, message: Any) -> bool:
        """Hand an entry of the shared log to the thread's subscriptions here (the relay
        calls this); one opened in another epoch is closed: its client resumes and is told
        to resync."""
        slot = self._table.get(thread_id)
        if slot is None or not slot.subscribers:
            return False
        took = False
        for subscription in list(slot.subscribers):
            if subscription.epoch is None:
                subscription.epoch = epoch
            elif subscription.epoch != epoch:
                subscription.close(f"history lost (epoch {subscription.epoch} -> {epoch})")
                continue
            took = subscription.offer(seq, message) or took
        return took

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"threads={len(self._table)}"
        return f"<Guard {self.name} {state} pending={self._flow.total}>"

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def refresh(self) -> None:
        """Re-read whether anyone listens to records and whether an OpenTelemetry SDK stands
        behind the providers (called when plugins change, and on each association while no
        SDK was found). Call it after configuring OpenTelemetry to trace the very next send."""
        self._tel.refresh()
        self._plan()

    def _plan(self) -> None:
        probing = self._tel.probing
        self._pipeline.probe = self._probe if probing else None
        self._pipeline.plan(
            subscribed=bool(self._subscribed),
            listening=hooks.listening(),
            instrumented=self._tel.active or probing or self._delivery.confirm is not None,
            closed=self.closed,
        )

    def _probe(self) -> None:
        """Run before each send while instrumented without an SDK found yet (the
        instrumentor's promise: an SDK configured later traces the very next send)."""
        if self._tel.stale() and self._tel.refresh():
            self._plan()

    # ------------------------------------------------------------------ sends

    def send(
        self, thread_id: Hashable, message: Any, deliver: AsyncDeliver
    ) -> Coroutine[Any, Any, bool]:
        """Emit ``message`` to ``thread_id`` through ``deliver(message)``, the original async
        send (returns a coroutine to await).

        The coroutine returns True when the message was delivered or accepted into the outbox,
        False when it was rejected, dropped or failed (in strict mode those raise
        :class:`~emitguard.EmissionError`).
        """
        return self._senders.send_call(
            thread_id, message, deliver, (message,), _NO_KWARGS, rebind_only
        )

    def send_sync(self, thread_id: Hashable, message: Any, deliver: SyncDeliver) -> bool:
        """Like :meth:`send` for a synchronous original; never waits on the barrier."""
        return self._senders.send_sync_call(
            thread_id, message, deliver, (message,), _NO_KWARGS, rebind_only
        )

    def sender(self, thread: Arg | AnyOf, message: Arg, kind: Arg | None = None) -> WraptWrapper:
        """A wrapt wrapper ``(wrapped, instance, args, kwargs)`` that guards an async send
        whose thread and message arguments sit at ``thread`` (one argument, or aliases) and
        ``message``; ``kind``: where the event type sits when the call names it apart from
        the message (``emit(event, data, room)``)."""
        return self._senders.sender(thread, message, kind)

    def sync_sender(
        self, thread: Arg | AnyOf, message: Arg, kind: Arg | None = None
    ) -> WraptWrapper:
        """:meth:`sender` for a synchronous send (it never waits on the barrier)."""
        return self._senders.sync_sender(thread, message, kind)

    @property
    def send_call(self) -> Callable[..., Coroutine[Any, Any, bool]]:
        """``send_call(thread_id, message, fn, args, kwargs, rebind)``: :meth:`send` for
        adapters (see :meth:`emitguard._senders.Senders.send_call`)."""
        return self._senders.send_call

    @property
    def send_sync_call(self) -> Callable[..., bool]:
        """:attr:`send_call` for a synchronous original."""
        return self._senders.send_sync_call

    # ------------------------------------------------------- thread lifecycle

    def mark_connected(self, thread_id: Hashable, owner: object = None) -> None:
        """The thread is associated with a live connection (of ``owner``, if given).

        Wakes every send waiting on the barrier and flushes the outbox before newer sends.
        Called while a transport adapter serves a connection (:func:`transport.serving`),
        that connection is the owner, whatever ``owner`` says. Safe from any OS thread.
        """
        check_thread_id(thread_id)
        serving = transport.serving_owner()
        self._associate(thread_id, serving if serving is not None else owner)

    def _associate(self, thread_id: Hashable, owner: object) -> None:
        self._flow.here()
        table = self._table
        with table.mutex:
            slot = table.slot(thread_id)
            slot.home = running_loop() or slot.home
            if owner is not None:
                table.own(slot, owner)
            slot.timed_out = False
            self._flow.reset_retry(slot)
            table.set_state(slot, CONNECTED, None)
        if not self._tel.complete and self._tel.refresh():  # an SDK configured since
            self._plan()
        if slot.wake_ready(True):
            # The send that held the line, parked on the barrier, died with its event loop
            # (closed with the task pending): nobody else will give the line up.
            log.warning("%s: the line's holder died with its event loop; line reset", slot)
            slot.parked = 0
            self._flow.leave(slot)
        self._flow.changed.fire()
        if slot.backlog:
            self._flow.schedule(slot)

    def mark_disconnected(self, thread_id: Hashable, reason: str = "marked disconnected") -> None:
        """The thread has no live connection: sends buffer at once until it is associated."""
        check_thread_id(thread_id)
        table = self._table
        with table.mutex:
            slot = table.slot(thread_id)
            table.disown(slot)
            self._flow.reset_retry(slot)
            table.set_state(slot, ConnectionState.DISCONNECTED, reason)
        slot.wake_ready(False)
        table.settled(slot)

    def mark_error(self, thread_id: Hashable, error: BaseException | str) -> None:
        """The association of the thread raised: sends buffer at once."""
        check_thread_id(thread_id)
        note = (
            error
            if isinstance(error, str)
            else f"association raised {type(error).__name__}: {error}"
        )
        table = self._table
        with table.mutex:
            slot = table.slot(thread_id)
            table.set_state(slot, ConnectionState.ERROR, note)
        slot.wake_ready(False)
        table.settled(slot)

    def disconnect_owner(self, owner: object, reason: str | None = None) -> list[Hashable]:
        """``owner`` went away: its threads that no other owner carries are disconnected.

        Returns the threads that were disconnected.
        """
        gone: list[Hashable] = []
        table = self._table
        transport.forget(owner)
        for slot in table.owner_gone(owner):
            with table.mutex:
                if not slot.owners and slot.state is CONNECTED:
                    note = reason or f"owner {owner!r} disconnected"
                    table.set_state(slot, ConnectionState.DISCONNECTED, note)
                    gone.append(slot.thread_id)
            table.settled(slot)
        return gone

    def owner_alive(self, owner: object) -> list[Hashable]:
        """``owner`` (a connection) is alive: a frame just left through it. The threads it
        still carries that were disconnected because deliveries to them kept failing (a
        consumer slower than the confirmation) are associated again, which flushes what they
        kept. Threads it left, or that were disconnected explicitly, are not touched (those
        calls took the owner off them). Returns the threads associated again.

        (Called for every frame: it looks only while something is buffered, as a thread
        disconnected by failed deliveries keeps them; one whose buffer emptied meanwhile
        comes back with the first frame after its next send is kept.)"""
        back: list[Hashable] = []
        if not self._flow.backlogged:
            return back
        for slot in self._table.carried(owner):
            if slot.state is ConnectionState.DISCONNECTED:
                self._associate(slot.thread_id, owner)
                back.append(slot.thread_id)
        return back

    def leave(self, thread_id: Hashable, owner: object, reason: str | None = None) -> bool:
        """``owner`` leaves one thread (a socket leaving a room), keeping its others: the
        thread is disconnected when no other owner carries it. Returns True when that
        disconnected it."""
        check_thread_id(thread_id)
        table = self._table
        slot = table.get(thread_id)
        if slot is None:
            return False
        gone = False
        with table.mutex:
            if table.leave(slot, owner) and not slot.owners and slot.state is CONNECTED:
                note = reason or f"owner {owner!r} left the thread"
                table.set_state(slot, ConnectionState.DISCONNECTED, note)
                gone = True
        table.settled(slot)
        return gone

    def confirm_deliveries(self, timeout: float | None = 0.05) -> None:
        """Take an async send as delivered only when a transport adapter saw a frame leave
        (waiting up to ``timeout`` seconds for frames sent by tasks the send spawned);
        ``None`` stops confirming. The Starlette middleware turns this on."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
        ):
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        self._delivery.confirm = None if timeout is None else float(timeout)
        self._plan()

    def _adopt(self, slot: ThreadSlot, probe: transport.Probe) -> None:
        """The connections a confirmed delivery went through carry the thread."""
        for owner in probe.owners - slot.owners:
            self._table.own(slot, owner)

    def _state_changed(self, thread_id: Any, old: ConnectionState, new: ConnectionState) -> None:
        if self._relay is not None:  # deliver the thread's shared log here while connected
            if new is CONNECTED:
                self._relay.associate(thread_id)
            elif old is CONNECTED:
                self._relay.dissociate(thread_id)
        hooks.call_safely(
            "emitguard_state_changed", guard=self, thread_id=thread_id, old=old, new=new
        )

    # ------------------------------------------------------------- replay

    def replay(
        self, thread_id: Hashable, after: int, epoch: str | None = None, *, peek: bool = False
    ) -> Replay:
        """What a client that last saw ``seq == after`` missed of the thread's delivered
        messages, from the replay window (option ``history``). Call it inside :meth:`hold`
        so that no send slips in between the replay and the client's attachment.

        The replay is taken as handed to a client: with a shared backend, the thread's next
        delivery in this process starts after it (the client has it already). ``peek=True``
        only looks (whether a client could resume, say): nothing is taken as handed over.

        With a shared backend (Redis) the window is the thread's log, on every worker, and
        ``epoch`` is the one of the client's cursor (``Replay.epoch``): another epoch means
        the history was lost, and the replay is not complete. This blocks on a Redis call;
        async code prefers :meth:`areplay`."""
        check_thread_id(thread_id)
        if self._relay is not None:
            return self._relay.replay_sync(str(thread_id), after, epoch, peek)
        if self._window is None:
            raise ValueError("replay() needs a replay window: build the guard with history=N")
        slot = self._table.get(thread_id)
        latest = slot.seq if slot is not None else self._window.latest(thread_id)
        return self._window.replay(thread_id, after, latest)

    def last_seq(self, thread_id: Hashable) -> int:
        """The last ``seq`` given to an emission of the thread (0: none yet): a client that
        joins now has seen nothing after it."""
        slot = self._table.get(thread_id)
        if slot is not None:
            return slot.seq
        return self._window.latest(thread_id) if self._window is not None else 0

    async def areplay(
        self, thread_id: str, after: int, epoch: str | None = None, *, peek: bool = False
    ) -> Replay:
        """:meth:`replay` for async code (it awaits the Redis calls of a shared backend)."""
        check_thread_id(thread_id)
        if self._relay is not None:
            return await self._relay.replay(thread_id, after, epoch, peek)
        return self.replay(thread_id, after, epoch, peek=peek)

    @contextlib.asynccontextmanager
    async def hold(self, thread_id: Hashable) -> AsyncIterator[None]:
        """Hold the thread's line: no delivery or flush of the thread runs meanwhile (sends
        wait their turn, in order). For replaying to a client before it goes live.

        When the line's holder is a send parked on the readiness barrier (the thread was
        never associated), this does not wait for it: nothing of the thread can be delivered
        before the association, which is what the body is about to make. The parked send,
        woken by that association, delivers only once the body has returned.
        """
        check_thread_id(thread_id)
        slot = self._table.slot(thread_id)
        while slot.gate is not None:  # another hold is stepping ahead of a parked send
            await slot.gate.wait(0.05)
        if slot.parked and slot.state is ConnectionState.CONNECTING:
            gate = slot.gate = Signal()
            try:
                yield
            finally:
                slot.gate = None
                gate.fire()
            return
        slot, ticket = self._table.take(thread_id)
        if ticket is not None:
            assert ticket.future is not None
            try:
                await ticket.future
            except asyncio.CancelledError:
                if ticket.future.done() and not ticket.future.cancelled():
                    self._flow.leave(slot)
                raise
        try:
            if slot.flight:  # what is in flight lands in the window (or the outbox) first
                await slot.flight.settled()
            yield
        finally:
            self._flow.leave(slot)

    def subscribe(self, thread_id: Hashable, *, maxsize: int = 1000) -> Subscription:
        """Open a :class:`~emitguard.Subscription` to the thread's deliveries (for a fallback
        transport such as Server-Sent Events). It counts as a connection of the thread: the
        thread is associated now (its outbox flushes to it), and disconnected when the last
        carrier goes. Open it inside :meth:`hold` after a :meth:`replay` so that nothing falls
        between the two."""
        check_thread_id(thread_id)
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1, got {maxsize!r}")
        subscription = Subscription(thread_id, maxsize, self._unsubscribed)
        with self._table.mutex:
            self._table.slot(thread_id).subscribers.append(subscription)
            self._subscribed += 1
        self._plan()
        self._associate(thread_id, subscription)  # the subscription owns it, not a connection
        return subscription

    def end_subscriptions(self, thread_id: Hashable, reason: str = "ended by the server") -> int:
        """Close every subscription of the thread (their clients reconnect and resume);
        returns how many were open."""
        slot = self._table.get(thread_id)
        open_ones = list(slot.subscribers) if slot is not None else []
        for subscription in open_ones:
            subscription.close(reason)
        return len(open_ones)

    def subscribers(self, thread_id: Hashable) -> int:
        """How many subscriptions of the thread are open."""
        slot = self._table.get(thread_id)
        return len(slot.subscribers) if slot is not None else 0

    def _unsubscribed(self, subscription: Subscription) -> None:
        slot = self._table.get(subscription.thread_id)
        with self._table.mutex:
            if slot is not None and subscription in slot.subscribers:
                slot.subscribers.remove(subscription)
                self._subscribed -= 1
        self._plan()
        self.disconnect_owner(subscription, f"subscription closed: {subscription.reason}")

    # ------------------------------------------------------------- queries

    @property
    def telemetry_active(self) -> bool:
        """Whether this guard records OpenTelemetry spans or metrics: an SDK stands behind a
        provider it uses and the option for it is on (see ``docs/tracing.md``)."""
        return self._tel.active

    def state(self, thread_id: Hashable) -> ConnectionState:
        """The thread's state (``CONNECTING`` for a thread the guard does not hold)."""
        slot = self._table.get(thread_id)
        return slot.state if slot is not None else ConnectionState.CONNECTING

    def threads(self) -> Iterator[Hashable]:
        """Every thread the guard holds state for."""
        return iter(list(self._table.slots))

    async def wait_ready(self, thread_id: Hashable, timeout: float | None = None) -> bool:
        """Wait until the thread is associated; False when ``timeout`` (default
        ``ready_timeout``) passes first. Agent executors await this before they start."""
        check_thread_id(thread_id)
        slot = self._table.slot(thread_id)
        if slot.state is CONNECTED:
            return True
        limit = self.options.ready_timeout if timeout is None else timeout
        if self._relay is not None:  # associated in any process
            return await self._relay.wait_ready(str(thread_id), limit)
        await self._pipeline.wait_ready(slot, limit)
        self._table.settled(slot)
        return slot.state is CONNECTED

    def stats(self) -> GuardStats:
        """Counts per outcome (cumulative), pending per thread and thread states (expiring
        what is due). Exact whenever no send is in flight."""
        if self.outbox.synchronous:
            drive(self._flow.expire())
        table, recorder = self._table, self._recorder
        outcomes = dict(recorder.counts)
        issued = table.retired + sum(slot.seq - slot.base for slot in list(table.slots.values()))
        outcomes[Outcome.DELIVERED] += issued - recorder.recorded_seqs
        pending = {slot.thread_id: slot.backlog for slot in list(self._flow.backlogged)}
        states = {name: slot.state for name, slot in list(table.slots.items())}
        waiting = {
            name: count
            for name, slot in list(table.slots.items())
            if (count := sum(1 for t in list(slot.tickets) if t.keep is not None and not t.waiting))
        }
        flying = {name: len(slot.flight) for name, slot in list(table.slots.items()) if slot.flight}
        if self._relay is not None:
            pending.update(self._relay.pending())
            return GuardStats(outcomes, pending, states, waiting, self._relay.describe(), flying)
        return GuardStats(outcomes, pending, states, waiting, in_flight=flying)

    async def pending(self, thread_id: Hashable | None = None) -> list[OutboxEntry]:
        """The buffered entries of one thread, or of every thread, oldest first."""
        if thread_id is not None:
            return await self.outbox.entries(thread_id)
        found: list[OutboxEntry] = []
        for name in sorted(slot.thread_id for slot in self._flow.backlogged):
            found.extend(await self.outbox.entries(name))
        return found

    async def drain(self, timeout: float = 5.0) -> int:
        """Wait until everything buffered is delivered (threads that reconnect meanwhile
        included) or ``timeout`` seconds pass, like a producer's flush; return how many
        emissions are still buffered (expired ones are recorded and not counted)."""
        if self._relay is not None:
            return await self._relay.drain(timeout)
        return await self._flow.drain(timeout, self._busy)

    def _busy(self) -> bool:
        """A send is waiting for its thread or its turn (it is not in the outbox yet), or
        for its confirmation."""
        return any(
            slot.parked or slot.tickets or slot.flight for slot in list(self._table.slots.values())
        )

    async def aclose(self) -> None:
        """Close the guard: background work stops, the outbox is closed, and what it still
        held is logged (a memory outbox cannot keep it). Later sends go to the original send
        unguarded (recorded, and logged once), so the host keeps working."""
        if self.closed:
            return
        self.closed = True
        self._plan()
        if self._relay is not None:
            await self._relay.close()
        await self._flow.close()
        _live.discard(self)


def check_thread_id(thread_id: object) -> None:
    """Raise :class:`ValueError` unless ``thread_id`` is a usable thread id (any hashable
    but ``None``, a ``bool`` or an empty ``str``: see :mod:`emitguard._ids`)."""
    bad = id_problem(thread_id)
    if bad is not None:
        raise ValueError(bad)


def live_guards() -> list[Guard]:
    """Every guard constructed in this process that is still alive and not closed."""
    return [guard for guard in _live.guards() if isinstance(guard, Guard) and not guard.closed]


@atexit.register
def _report_at_exit() -> None:
    for guard in live_guards():
        guard._flow.report_left("at interpreter exit")
