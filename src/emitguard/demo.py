"""``emitguard simulate``: the incident's race in memory, run bare and then guarded, side by side.

Each simulated run is one agent working on its own thread (``thread-<i>``) for its own user
(``user-<i>``) against :class:`emitguard.testing.ReferenceManager`, the in-memory copy of the
legacy connection manager from the emission failure report:

1. the client connects (``manager.connect(user)``, no thread yet);
2. the agent starts emitting its five events at once, with small seeded pauses between them;
3. the client's thread association (``update_connection_thread``) lands after a seeded lag;
4. in a seeded share of the runs the connection drops after event *k* (``drop_connection``
   behind the manager's back, or ``disconnect_user``) and the client reconnects and
   re-associates after short seeded delays.

The same draws are replayed twice: on the bare manager, then on the manager guarded with
:func:`emitguard.guard`. What each thread's sockets actually received is then compared with
what the agent emitted.

Determinism: :func:`run_demo` runs on an event loop whose clock is virtual. The loop moves its
clock to the next timer only once nothing else is runnable, so which event beats which
association depends on the seeded draws alone, never on how busy the machine is. By default
the loop also sleeps for real as its clock moves (``pace=True``), so waits measured by the
engine on the real clock (``Emission.waited``) still mean something; those and the wall time
are the only numbers that vary between two runs with the same seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import emitguard
from emitguard._demo_output import (
    VARIES,
    ProgressBar,
    notes,
    render_table,
    table_rows,
    verdict,
)
from emitguard._virtual_loop import VirtualClockLoop, close_loop, resync
from emitguard.records import Emission
from emitguard.states import Outcome
from emitguard.testing import FakeSocket, ReferenceManager

__all__ = [
    "EVENTS",
    "VARIES",
    "BarrierWaits",
    "DemoConfig",
    "DemoReport",
    "DropPlan",
    "LegacyWarnings",
    "ProgressBar",
    "RunPlan",
    "ScenarioResult",
    "Tally",
    "VirtualClockLoop",
    "counting_legacy_warnings",
    "notes",
    "percentile",
    "plan_runs",
    "render_table",
    "run_demo",
    "run_guarded",
    "run_scenarios",
    "run_unguarded",
    "scenario_digest",
    "scenario_result",
    "simulate_run",
    "table_rows",
    "tally",
    "verdict",
]

EVENTS: tuple[str, ...] = (
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
)
"""What every simulated agent emits, in this order."""

LEGACY_LOGGER = "emitguard.testing.legacy.demo"
"""The logger the demo's legacy managers log to (a child of the legacy manager's logger)."""

CANNOT_DELIVER = "Cannot deliver"

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``, called as runs finish."""

DropKind = Literal["drop_connection", "disconnect_user"]


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What to simulate. Times are in seconds."""

    runs: int = 200
    seed: int = 7
    lag: float = 0.05
    """Largest delay between connecting and the thread association."""
    drop_rate: float = 0.05
    """Share of runs whose connection drops mid-run and reconnects."""
    ready_timeout: float | None = None
    """The guard's readiness barrier; ``None``: ``lag + 1`` (longer than any association lag)."""
    drain_timeout: float = 5.0
    pace: bool = True
    """Sleep for real as the virtual clock moves (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if not math.isfinite(self.lag) or self.lag < 0:
            raise ValueError(f"lag must be a finite number >= 0, got {self.lag}")
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be between 0 and 1, got {self.drop_rate}")

    @property
    def barrier_timeout(self) -> float:
        """The ``ready_timeout`` the guard gets."""
        return self.ready_timeout if self.ready_timeout is not None else self.lag + 1.0


@dataclasses.dataclass(frozen=True)
class DropPlan:
    """A connection that drops after event ``after_event`` (1-based) and comes back."""

    after_event: int
    kind: DropKind
    reconnect_after: float
    """Delay between the drop and the new connection."""
    reassociate_after: float
    """Delay between the new connection and its thread association."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Every random choice of one run, drawn up front."""

    index: int
    associate_after: float
    gaps: tuple[float, ...]
    """Pauses of the agent between consecutive events."""
    drop: DropPlan | None

    @property
    def thread_id(self) -> str:
        return f"thread-{self.index}"

    @property
    def user_id(self) -> str:
        return f"user-{self.index}"


def plan_runs(config: DemoConfig) -> list[RunPlan]:
    """Draw every run's timings from ``random.Random(config.seed)``.

    Every run consumes the same number of draws whatever the options, so changing
    ``drop_rate`` changes which runs drop, not the timings of the others.
    """
    rng = random.Random(config.seed)
    return [_plan_one(rng, index, config) for index in range(config.runs)]


def scenario_digest(plans: Sequence[RunPlan]) -> str:
    """A short fingerprint of the plans: equal for equal seeds and options, so two reports
    with one digest played the same scenario."""
    text = "\n".join(repr(plan) for plan in plans)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plan_one(rng: random.Random, index: int, config: DemoConfig) -> RunPlan:
    lag = config.lag
    associate_after = rng.uniform(0.0, lag)
    gaps = tuple(rng.uniform(0.0, lag / 2) for _ in EVENTS[1:])
    roll = rng.random()
    drop = DropPlan(
        after_event=rng.randint(1, len(EVENTS) - 1),
        kind=rng.choice(("drop_connection", "disconnect_user")),
        reconnect_after=rng.uniform(0.0, lag),
        reassociate_after=rng.uniform(0.0, lag / 2),
    )
    return RunPlan(index, associate_after, gaps, drop if roll < config.drop_rate else None)


# --------------------------------------------------------------------------- one run


async def simulate_run(manager: ReferenceManager, plan: RunPlan) -> None:
    """Play one run: the client connects, then the agent and the client go on concurrently."""
    socket = manager.connect(plan.user_id)
    reached = asyncio.Event()
    await asyncio.gather(_agent(manager, plan, reached), _client(manager, plan, socket, reached))


async def _agent(manager: ReferenceManager, plan: RunPlan, reached: asyncio.Event) -> None:
    """Start emitting at once, pausing briefly between events; say when the drop point passed."""
    drop_after = plan.drop.after_event if plan.drop is not None else None
    for number, event in enumerate(EVENTS, start=1):
        if number > 1:
            await asyncio.sleep(plan.gaps[number - 2])
        message = {"type": event, "thread_id": plan.thread_id, "n": number}
        await manager.send_to_thread(plan.thread_id, message)
        if number == drop_after:
            reached.set()


async def _client(
    manager: ReferenceManager, plan: RunPlan, socket: FakeSocket, reached: asyncio.Event
) -> None:
    """Associate the thread after the lag; drop and come back if the plan says so."""
    await asyncio.sleep(plan.associate_after)
    manager.update_connection_thread(plan.user_id, plan.thread_id)
    drop = plan.drop
    if drop is None:
        return
    await reached.wait()
    if drop.kind == "drop_connection":
        manager.drop_connection(socket.connection_id)
    else:
        manager.disconnect_user(plan.user_id)
    await asyncio.sleep(drop.reconnect_after)
    manager.connect(plan.user_id)
    await asyncio.sleep(drop.reassociate_after)
    manager.update_connection_thread(plan.user_id, plan.thread_id)


async def _play_all(
    manager: ReferenceManager, plans: Sequence[RunPlan], phase: str, progress: Progress | None
) -> None:
    """Play every run concurrently, reporting progress as they finish."""
    done = 0
    total = len(plans)

    async def one(plan: RunPlan) -> None:
        nonlocal done
        await simulate_run(manager, plan)
        done += 1
        if progress is not None:
            progress(phase, done, total)

    if progress is not None:
        progress(phase, 0, total)
    await asyncio.gather(*(one(plan) for plan in plans))


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Tally:
    """What the clients received, compared with what was emitted."""

    delivered: int
    out_of_order: int
    duplicates: int


def tally(received: Mapping[str, Iterable[Any]], key: str) -> Tally:
    """Count unique deliveries, late arrivals and duplicate copies per thread.

    ``key`` names the field that identifies an emission (``"seq"`` for the guarded run, whose
    delivery is at least once). An event is out of order when it arrives after an event that
    was emitted later (field ``n``, the emission order).
    """
    delivered = out_of_order = duplicates = 0
    for messages in received.values():
        seen: set[Any] = set()
        highest = 0
        for message in messages:
            ident = message.get(key)
            if ident in seen:
                duplicates += 1
                continue
            seen.add(ident)
            number = message["n"]
            if number < highest:
                out_of_order += 1
            highest = max(highest, number)
        delivered += len(seen)
    return Tally(delivered, out_of_order, duplicates)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass(frozen=True)
class ScenarioResult:
    """The numbers of one scenario. Guard-only fields are ``None`` for the bare run."""

    name: str
    runs: int
    drops: int
    emitted: int
    delivered: int
    lost: int
    out_of_order: int
    duplicates: int
    legacy_warnings: int
    wall_time: float
    held: int | None = None
    """Sends the readiness barrier held (``Emission.waited > 0``)."""
    barrier_wait_p50: float | None = None
    barrier_wait_p99: float | None = None
    still_buffered: int | None = None
    """What ``guard.drain()`` left in the outbox."""
    outcomes: dict[str, int] | None = None
    """``guard.stats().outcomes``, by outcome name."""
    latency_p50: float | None = None
    """Seconds from the agent's send to the client's receipt (first copies; real sockets)."""
    latency_p99: float | None = None
    events_per_s: float | None = None
    """Unique deliveries per second of wall time (real sockets)."""
    repeated: int = 0
    """Events that arrived twice under different seqs: duplicates that seq dedupe cannot
    catch (the guard never does this; the demo checks it)."""

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing out of order, nothing delivered twice after seq dedupe."""
        return self.lost == 0 and self.out_of_order == 0 and self.repeated == 0


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """Both scenarios of one demo."""

    config: DemoConfig
    unguarded: ScenarioResult
    guarded: ScenarioResult
    setup: str = "guard"
    """What the guarded scenario adds to the bare app (``guard``, ``middleware``, ``resume``)."""
    clock: Literal["virtual", "network"] = "virtual"
    """``virtual``: ``emitguard simulate``; ``network``: ``emitguard demo`` over sockets."""
    workers: int = 1
    """Server processes (``emitguard demo --workers N``: more than one, on one Redis)."""

    @property
    def ok(self) -> bool:
        """The guarded run lost nothing and reordered nothing."""
        return self.guarded.ok

    @property
    def scenario_digest(self) -> str:
        """A fingerprint of the seeded plans (:func:`scenario_digest`)."""
        return scenario_digest(plan_runs(self.config))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``varies`` names, per side, the fields that depend on timing
        (every other number is fixed by the seed)."""
        return {
            "config": dataclasses.asdict(self.config),
            "scenario": self.scenario_digest,
            "varies": {side: list(fields) for side, fields in VARIES[self.clock].items()},
            "unguarded": dataclasses.asdict(self.unguarded),
            "guarded": dataclasses.asdict(self.guarded),
            "setup": self.setup,
            "clock": self.clock,
            "workers": self.workers,
            "ok": self.ok,
            "verdict": verdict(self),
            "notes": notes(self),
        }


class LegacyWarnings(logging.Handler):
    """Counts the legacy manager's "Cannot deliver" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.cannot_deliver = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(CANNOT_DELIVER):
            self.cannot_deliver += 1


@contextlib.contextmanager
def counting_legacy_warnings(logger: logging.Logger, show: bool) -> Iterator[LegacyWarnings]:
    """Count the legacy manager's warnings on ``logger``; hide them unless ``show``."""
    counter = LegacyWarnings()
    logger.addHandler(counter)
    logger.propagate = show
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.propagate = True


class BarrierWaits:
    """An emitguard listener keeping ``waited`` of one guard's terminal records."""

    def __init__(self, guard: emitguard.Guard) -> None:
        self.guard = guard
        self.waits: list[float] = []

    @emitguard.hookimpl
    def emitguard_emission(self, emission: Emission, guard: emitguard.Guard) -> None:
        if guard is self.guard and emission.outcome is not Outcome.BUFFERED:
            self.waits.append(emission.waited)


# --------------------------------------------------------------------------- scenarios


async def run_unguarded(
    config: DemoConfig,
    plans: Sequence[RunPlan],
    *,
    progress: Progress | None = None,
    show_legacy_logs: bool = False,
) -> ScenarioResult:
    """Play the runs on a bare legacy manager."""
    with _legacy_manager(show_legacy_logs) as (manager, counter):
        resync()
        started = time.perf_counter()
        await _play_all(manager, plans, "unguarded", progress)
        wall = time.perf_counter() - started
    got = tally(_received(manager, plans), "n")
    return scenario_result("unguarded", plans, got, counter.cannot_deliver, wall)


async def run_guarded(
    config: DemoConfig,
    plans: Sequence[RunPlan],
    *,
    progress: Progress | None = None,
    show_legacy_logs: bool = False,
) -> ScenarioResult:
    """Play the same runs on a legacy manager guarded with :func:`emitguard.guard`."""
    with _legacy_manager(show_legacy_logs) as (manager, counter):
        result = await _play_guarded(config, plans, manager, progress)
    return dataclasses.replace(result, legacy_warnings=counter.cannot_deliver)


async def _play_guarded(
    config: DemoConfig,
    plans: Sequence[RunPlan],
    manager: ReferenceManager,
    progress: Progress | None,
) -> ScenarioResult:
    guard = emitguard.guard(
        manager,
        disconnect="disconnect_user",
        stamp_seq="seq",
        ready_timeout=config.barrier_timeout,
    )
    listener = BarrierWaits(guard)
    emitguard.register(listener)
    try:
        resync()
        started = time.perf_counter()
        await _play_all(manager, plans, "guarded", progress)
        still_buffered = await guard.drain(config.drain_timeout)
        wall = time.perf_counter() - started
        stats = guard.stats()
    finally:
        emitguard.unregister(listener)
        await guard.aclose()
        emitguard.unguard(manager)
    held = [waited for waited in listener.waits if waited > 0]
    result = scenario_result("guarded", plans, tally(_received(manager, plans), "seq"), 0, wall)
    return dataclasses.replace(
        result,
        held=len(held),
        barrier_wait_p50=percentile(held, 50),
        barrier_wait_p99=percentile(held, 99),
        still_buffered=still_buffered,
        outcomes={outcome.value: count for outcome, count in stats.outcomes.items()},
    )


async def run_scenarios(
    config: DemoConfig, *, progress: Progress | None = None, show_legacy_logs: bool = False
) -> DemoReport:
    """Draw the plans, then play them unguarded and guarded, on the running loop."""
    plans = plan_runs(config)
    unguarded = await run_unguarded(
        config, plans, progress=progress, show_legacy_logs=show_legacy_logs
    )
    guarded = await run_guarded(config, plans, progress=progress, show_legacy_logs=show_legacy_logs)
    return DemoReport(config, unguarded, guarded)


def run_demo(
    config: DemoConfig | None = None,
    *,
    progress: Progress | None = None,
    show_legacy_logs: bool = False,
) -> DemoReport:
    """Run the demo on its own virtual-clock event loop (reproducible; see the module doc)."""
    config = config if config is not None else DemoConfig()
    loop = VirtualClockLoop(pace=config.pace)
    try:
        return loop.run_until_complete(
            run_scenarios(config, progress=progress, show_legacy_logs=show_legacy_logs)
        )
    finally:
        close_loop(loop)


@contextlib.contextmanager
def _legacy_manager(show_logs: bool) -> Iterator[tuple[ReferenceManager, LegacyWarnings]]:
    """A reference manager on the demo's logger, its warnings counted meanwhile."""
    logger = logging.getLogger(LEGACY_LOGGER)
    with counting_legacy_warnings(logger, show_logs) as counter:
        yield ReferenceManager(logger=logger), counter


def _received(manager: ReferenceManager, plans: Iterable[RunPlan]) -> dict[str, list[Any]]:
    return {plan.thread_id: manager.received(plan.thread_id) for plan in plans}


def scenario_result(
    name: str, plans: Sequence[RunPlan], got: Tally, warnings: int, wall: float
) -> ScenarioResult:
    """The counts of a scenario from what its clients received (``got``)."""
    emitted = len(plans) * len(EVENTS)
    return ScenarioResult(
        name=name,
        runs=len(plans),
        drops=sum(1 for plan in plans if plan.drop is not None),
        emitted=emitted,
        delivered=got.delivered,
        lost=emitted - got.delivered,
        out_of_order=got.out_of_order,
        duplicates=got.duplicates,
        legacy_warnings=warnings,
        wall_time=wall,
    )
