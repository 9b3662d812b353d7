"""Same behaviour on every path (issue 10, point 2): a differential state machine.

Every generated step (sends awaited, as tasks, synchronous, with a caller-side timeout, bad
inputs; associations from a coroutine and from plain code; owner disconnects,
``mark_disconnected``, sockets going down and up, transient failures, deliveries held in the
socket before or after it takes the message; cancellations; time passing; ``drain``) is
applied to two guards built with the same options:

- **plain**: nothing attached (no listener, no telemetry, no seq stamping);
- **observed**: an ``emitguard_emission`` listener registered for it, OpenTelemetry SDK
  providers (``TracerProvider`` with an in-memory exporter, ``MeterProvider`` with an
  in-memory reader) and, in some examples, ``stamp_seq``.

Each guard runs on its own virtual-clock loop (the demo's ``VirtualClockLoop``, ``pace=False``),
so timers (the readiness barrier, caller timeouts, any retry backoff) fire at the same step for
both, and after every step each loop runs until it settles. The listener is registered only
while the observed guard's loop runs, so the plain guard never has anyone listening. After every
step, and after everything is associated and drained at the end, both must show the same: what
each socket received, in order; what every send returned (or that it is still running, was
cancelled or timed out); every thread's state; the pending counts; the counts per outcome; and
the return values of ``disconnect_owner`` and ``drain``. """

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import emitguard
from emitguard import Emission, Guard
from emitguard._virtual_loop import VirtualClockLoop
from support import EVENT_TYPES, OWNERS, THREADS, Sockets

SETTLE_TICKS = 40
"""Loop iterations after each step: enough for every runnable task of both guards to reach
its next real wait, whatever the path's number of internal awaits."""


class Listener:
    """Collects the records of one guard (and so makes emitguard record them)."""

    def __init__(self) -> None:
        self.guard: Guard | None = None
        self.records: list[Emission] = []

    @emitguard.hookimpl
    def emitguard_emission(self, emission: Emission, guard: Guard) -> None:
        if guard is self.guard:
            self.records.append(emission)


class Manager:
    """A legacy manager whose async send hands the message to the thread's fake socket.
    Guarded with ``emitguard.guard(manager, associate=None)``: its sends take the route
    apps use (the adapter's wrapper, the engine's fast path when nothing is attached)."""

    def __init__(self, sockets: Sockets) -> None:
        self.sockets = sockets

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        return await self.sockets.deliver(thread_id)(message)


class Side:
    """One guard with its own loop, fake sockets, manager and the sends made to it."""

    def __init__(self, name: str, listener: Listener | None) -> None:
        self.name = name
        self.loop = VirtualClockLoop(pace=False)
        self.listener = listener
        self.sockets = Sockets()
        self.manager = Manager(self.sockets)
        self.guard: Guard | None = None
        self.tasks: dict[int, asyncio.Task[bool]] = {}
        self.results: dict[int, object] = {}
        self.exporter: InMemorySpanExporter | None = None
        self.providers: tuple[TracerProvider, MeterProvider] | None = None

    @property
    def g(self) -> Guard:
        assert self.guard is not None
        return self.guard

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The listener is registered while this side's code runs, and only then."""
        if self.listener is None:
            yield
            return
        emitguard.register(self.listener)
        try:
            yield
        finally:
            emitguard.unregister(self.listener)

    def run(self, awaitable: Awaitable[Any]) -> Any:
        with self.active():
            return self.loop.run_until_complete(awaitable)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` from a coroutine on the loop (a handler of the app)."""

        async def call() -> Any:
            return fn(*args)

        return self.run(call())

    def plain(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` from plain code, the loop paused."""
        with self.active():
            return fn(*args)

    def settle(self, ticks: int = SETTLE_TICKS) -> None:
        async def spin() -> None:
            for _ in range(ticks):
                await asyncio.sleep(0)

        self.run(spin())

    def start(self, uid: int, send: Callable[[], Awaitable[bool]]) -> None:
        """Call ``send()`` on the loop (as an agent would) and run it as a task."""

        async def main() -> asyncio.Task[bool]:
            return asyncio.ensure_future(send())

        self.tasks[uid] = self.run(main())

    def awaited(self, send: Callable[[], Awaitable[bool]]) -> bool:
        """Call ``send()`` on the loop and await it."""

        async def main() -> bool:
            return await send()

        result: bool = self.run(main())
        return result

    def outcome(self, uid: int) -> object:
        """What send ``uid`` came to, as far as its caller can tell."""
        if uid in self.results:
            return self.results[uid]
        task = self.tasks[uid]
        if not task.done():
            return "still running"
        if task.cancelled():
            return "cancelled"
        error = task.exception()
        return task.result() if error is None else f"raised {type(error).__name__}"

    def observe(self, uids: range) -> dict[str, object]:
        guard = self.g
        stats = guard.stats()
        return {
            "received": {t: [m["uid"] for m in self.sockets.received[t]] for t in THREADS},
            "sends": {uid: self.outcome(uid) for uid in uids},
            "states": {t: guard.state(t).name for t in THREADS},
            "pending": {t: n for t, n in sorted(stats.pending.items()) if n},
            "pending_total": stats.pending_total,
            "outcomes": {o.name: n for o, n in stats.outcomes.items() if n},
            "misrouted": len(self.sockets.misrouted),
        }

    def close(self) -> None:
        try:
            if self.guard is not None:
                self.run(self.g.aclose())
            for _ in range(5):
                leftover = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
                if not leftover:
                    break
                for task in leftover:
                    task.cancel()
                self.run(asyncio.gather(*leftover, return_exceptions=True))
            self.run(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            emitguard.unguard(self.manager)
            if self.providers is not None:
                self.providers[0].shutdown()
                self.providers[1].shutdown()


def differences(plain: dict[str, object], observed: dict[str, object]) -> list[str]:
    found: list[str] = []
    for key, mine in plain.items():
        theirs = observed[key]
        if mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            for sub in sorted(mine.keys() | theirs.keys(), key=str):
                if mine.get(sub) != theirs.get(sub):
                    found.append(
                        f"{key}[{sub}]: plain {mine.get(sub)!r}, observed {theirs.get(sub)!r}"
                    )
        else:
            found.append(f"{key}: plain {mine!r}, observed {theirs!r}")
    return found


class DifferentialMachine(RuleBasedStateMachine):
    """One sequence of steps, two guards: nothing attached, and listener + telemetry."""

    def __init__(self) -> None:
        super().__init__()
        self.plain_side = Side("plain", None)
        self.observed_side = Side("observed", Listener())
        self.sides = (self.plain_side, self.observed_side)
        self.uids = itertools.count(1)
        self.last_uid = 0
        self.steps: list[str] = []

    # -- setup ----------------------------------------------------------------------

    @initialize(
        on_unready=st.sampled_from(["wait", "buffer"]),
        ready_timeout=st.sampled_from([0.0, 0.01, 0.5]),
        max_per_thread=st.sampled_from([1000, 1, 2, 3]),
        max_total=st.sampled_from([100_000, 2, 4]),
        overflow=st.sampled_from(["drop_oldest", "drop_newest", "reject"]),
        protect=st.sampled_from([frozenset(), frozenset({"critical"})]),
        yields=st.sampled_from([0, 1, 2]),
        raises=st.booleans(),
        stamp=st.booleans(),
    )
    def setup(
        self,
        on_unready: str,
        ready_timeout: float,
        max_per_thread: int,
        max_total: int,
        overflow: str,
        protect: frozenset[str],
        yields: int,
        raises: bool,
        stamp: bool,
    ) -> None:
        options: dict[str, Any] = {
            "on_unready": on_unready,
            "ready_timeout": ready_timeout,
            "ttl": None,  # the TTL reads the wall clock: not the same for two guards
            "max_per_thread": max_per_thread,
            "max_total": max_total,
            "overflow": overflow,
            "protect": protect,
        }
        for side in self.sides:
            side.sockets = side.manager.sockets = Sockets(yields=yields, raises=raises)
        self.plain_side.guard = emitguard.guard(
            self.plain_side.manager, associate=None, name="plain", **options
        )
        observed = self.observed_side
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        observed.exporter = exporter
        observed.providers = (tracer_provider, meter_provider)
        observed.guard = emitguard.guard(
            observed.manager,
            associate=None,
            name="observed",
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            stamp_seq="seq" if stamp else None,
            **options,
        )
        assert observed.listener is not None
        observed.listener.guard = observed.guard
        assert observed.g.telemetry_active, "the observed guard must record spans or metrics"
        assert not self.plain_side.g.telemetry_active
        for side in self.sides:  # each guard's home is its virtual-clock loop from the start:
            side.run(side.g.drain(0))  # a retry set from plain code runs on it, not on a timer
            # thread of real time (which made two identical guards differ, run to run)

    def both(self, action: Callable[[Side], object], step: str) -> tuple[object, object]:
        """Apply ``action`` to each side, let each settle; return both results."""
        self.steps.append(step)
        results = []
        for side in self.sides:
            results.append(action(side))
            side.settle()
        return results[0], results[1]

    def same(self, what: str, results: tuple[object, object]) -> None:
        assert results[0] == results[1], f"{what}: plain {results[0]!r}, observed {results[1]!r}"

    def message(self, uid: int, thread: str, event_type: str) -> dict[str, Any]:
        return {"type": event_type, "uid": uid, "to": thread}

    # -- the connection side ------------------------------------------------------------

    @rule(
        thread=st.sampled_from(THREADS),
        owner=st.sampled_from(OWNERS),
        up=st.booleans(),
        from_plain_code=st.booleans(),
    )
    def associate(self, thread: str, owner: str, up: bool, from_plain_code: bool) -> None:
        def act(side: Side) -> object:
            if up:
                side.sockets.up[thread] = True
            call = side.plain if from_plain_code else side.call
            return call(side.g.mark_connected, thread, owner)

        self.both(act, f"associate {thread} {owner} up={up} plain_code={from_plain_code}")

    @rule(
        how=st.sampled_from(["owner", "owner and sockets", "thread", "socket down", "socket up"]),
        thread=st.sampled_from(THREADS),
        owner=st.sampled_from(OWNERS),
    )
    def connection_change(self, how: str, thread: str, owner: str) -> None:
        def act(side: Side) -> object:
            if how.startswith("owner"):
                gone: list[str] = side.call(side.g.disconnect_owner, owner)
                if how == "owner and sockets":
                    for name in gone:
                        side.sockets.up[name] = False
                return gone
            if how == "thread":
                return side.call(side.g.mark_disconnected, thread)
            side.sockets.up[thread] = how == "socket up"
            return None

        self.same(f"{how} {thread} {owner}", self.both(act, f"{how} {thread}/{owner}"))

    @rule(thread=st.sampled_from(THREADS), times=st.integers(1, 2))
    def transient_failure(self, thread: str, times: int) -> None:
        """The next deliveries to the thread raise once each; the socket stays up."""

        def act(side: Side) -> None:
            side.sockets.failing[thread] = times

        self.both(act, f"transient failure x{times} {thread}")

    @rule(thread=st.sampled_from(THREADS), after_taking=st.booleans())
    def hold(self, thread: str, after_taking: bool) -> None:
        """Deliveries to the thread block in the socket (before or after it takes the
        message) until released: a slow send."""

        def act(side: Side) -> None:
            side.sockets.hold(thread, after_taking=after_taking)

        self.both(act, f"hold {thread} after_taking={after_taking}")

    @rule(thread=st.sampled_from(THREADS))
    def release(self, thread: str) -> None:
        self.both(lambda side: side.sockets.release(thread), f"release {thread}")

    # -- sends ------------------------------------------------------------------------

    @rule(
        thread=st.sampled_from(THREADS),
        event_type=st.sampled_from(EVENT_TYPES),
        how=st.sampled_from(
            ["task", "task", "awaited", "timeout", "direct", "sync in loop", "sync", "bad"]
        ),
    )
    def send(self, thread: str, event_type: str, how: str) -> None:
        """One send through the guarded manager: started as a task (it runs on while later
        steps run), awaited for a little while, given up by its caller after 10 ms, or with
        a bad input; or straight through ``guard.send`` (a task) or ``guard.send_sync``
        (from a coroutine or from plain code)."""
        uid = self.last_uid = next(self.uids)
        message = self.message(uid, thread, event_type)

        def act(side: Side) -> None:
            guard, manager = side.g, side.manager
            if how == "bad":
                bad_thread: Any = {"t1": "", "t2": True}.get(thread, thread)
                bad_message = None if bad_thread == thread else dict(message)
                side.results[uid] = side.awaited(
                    lambda: manager.send_to_thread(bad_thread, bad_message)
                )
            elif how.startswith("sync"):
                args = (thread, dict(message), side.sockets.deliver_sync(thread))
                call = side.plain if how == "sync" else side.call
                side.results[uid] = call(guard.send_sync, *args)
            elif how == "direct":
                deliver = side.sockets.deliver(thread)
                side.start(uid, lambda: guard.send(thread, dict(message), deliver))
            elif how == "timeout":  # the caller gives up after 10 ms
                side.start(
                    uid,
                    lambda: asyncio.wait_for(manager.send_to_thread(thread, dict(message)), 0.01),
                )
            else:
                side.start(uid, lambda: manager.send_to_thread(thread, dict(message)))
                if how == "awaited":
                    side.run(asyncio.wait({side.tasks[uid]}, timeout=0.02))

        self.both(act, f"send {uid} {thread} {event_type} {how}")

    @rule(
        threads=st.lists(st.sampled_from(THREADS), min_size=2, max_size=4),
        event_type=st.sampled_from(EVENT_TYPES),
    )
    def send_burst(self, threads: list[str], event_type: str) -> None:
        uids = [next(self.uids) for _ in threads]
        self.last_uid = uids[-1]

        def act(side: Side) -> None:
            async def burst() -> None:
                for uid, thread in zip(uids, threads, strict=True):
                    message = self.message(uid, thread, event_type)
                    send = side.manager.send_to_thread(thread, message)
                    side.tasks[uid] = asyncio.ensure_future(send)

            side.run(burst())

        self.both(act, f"burst {uids} {threads}")

    @rule(pick=st.integers(0, 7))
    def cancel(self, pick: int) -> None:
        """The caller of a send still running goes away (its task is cancelled)."""
        running = sorted(uid for uid, task in self.plain_side.tasks.items() if not task.done())
        if not running:
            return
        uid = running[pick % len(running)]

        def act(side: Side) -> None:
            side.tasks[uid].cancel()

        self.both(act, f"cancel {uid}")

    # -- time -------------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.005, 0.03, 1.0]))
    def sleep(self, seconds: float) -> None:
        self.both(lambda side: side.run(asyncio.sleep(seconds)), f"sleep {seconds}")

    @rule()
    def drain(self) -> None:
        self.same("drain(0)", self.both(lambda side: side.run(side.g.drain(0)), "drain(0)"))

    # -- checks -----------------------------------------------------------------------

    @invariant()
    def same_observations(self) -> None:
        if self.plain_side.guard is None:
            return
        self.compare("after the last step")

    def compare(self, when: str) -> None:
        uids = range(1, self.last_uid + 1)
        found = differences(self.plain_side.observe(uids), self.observed_side.observe(uids))
        assert not found, (
            f"plain and observed guards differ {when}:\n  "
            + "\n  ".join(found)
            + "\nsteps:\n  "
            + "\n  ".join(self.steps)
        )

    def teardown(self) -> None:
        try:
            if self.plain_side.guard is not None:
                self.finish()
                self.compare("after everything was associated and drained")
        finally:
            for side in self.sides:
                side.close()

    def finish(self) -> None:
        """Release every socket, associate every thread, let every send end, drain."""

        def act(side: Side) -> None:
            async def finish() -> None:
                for thread in THREADS:
                    side.sockets.release(thread)
                    side.sockets.failing.pop(thread, None)
                    side.sockets.up[thread] = True
                    side.g.mark_connected(thread, OWNERS[0])
                for _ in range(5):
                    running = [task for task in side.tasks.values() if not task.done()]
                    if running:
                        await asyncio.wait(running, timeout=1.0)
                    await side.g.drain(0)
                    for _ in range(SETTLE_TICKS):
                        await asyncio.sleep(0)

            side.run(finish())

        self.both(act, "finish")


DifferentialMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("EMITGUARD_DIFF_EXAMPLES", "200")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    + ([] if os.environ.get("EMITGUARD_NO_SHRINK") else [Phase.shrink]),
)
TestDifferential = DifferentialMachine.TestCase
