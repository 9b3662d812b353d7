"""Load and faults, judged by what the fake sockets received (issue 10, DESIGN.md 3, 5, 7).

Two guarded managers of our own (:class:`support.ThreadManager`, a dict of thread -> sockets)
run at once:

- an async manager with ``2000 x scale`` threads of 10 events each, where agents race the
  association and the threads meet, one kind per thread: nothing; a transient send failure
  on a live socket (it recovers; nobody re-associates); a slow but healthy send that the
  caller gives up on with ``asyncio.wait_for`` (slow before the socket takes the message, or
  after: the documented at-least-once case); the owner disconnecting mid-run and coming back;
  the socket dying behind the manager's back and a new one associated from another OS thread;
  the first association made from another OS thread while the first send, cancelled by its
  caller, waited on the barrier;
- a synchronous manager (a threaded server) with ``200 x scale`` threads fed by 4 OS threads
  at once (``1000 x scale`` sends each, to every thread in turn), half the threads
  associated only later by those OS threads, a few sockets failing once.

Then, once every reconnect happened, ``drain()``. From what the sockets received: nothing
lost, nothing duplicated (except a message whose send was cancelled after the socket took it:
counted apart), nothing reordered, nothing pending, and no thread DISCONNECTED while a live
socket is tied to it. Run with ``-s`` to see the figures; ``--scale 5`` (or
``EMITGUARD_SCALE=5``) for 10,000 threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import emitguard
from emitguard import ConnectionState, Guard
from support import SyncThreadManager, ThreadManager

EVENTS = 10
KINDS = (
    "plain",
    "plain",
    "plain",
    "transient failure",
    "slow send, caller timeout",
    "slow ack, caller timeout",
    "owner drops, reconnects",
    "socket dies, reassociated from an OS thread",
    "associated from an OS thread, first send cancelled",
    "plain",
)
PRODUCERS = 4


@dataclass
class Figures:
    """What the sockets of one manager received, against what was sent."""

    name: str
    keys: int = 0
    sent: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    at_least_once: int = 0
    """Received twice, the first time by a send cancelled after the socket took it."""
    reordered: int = 0
    misrouted: int = 0
    pending_after_drain: int = 0
    stuck_disconnected: int = 0
    """Threads DISCONNECTED while a live socket is tied to them."""
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)
    by_kind: Counter[str] = field(default_factory=Counter)
    """Problems per kind of stream and kind of problem (``"lost: transient failure"``)."""

    def note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)

    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicated
            or self.reordered
            or self.misrouted
            or self.pending_after_drain
            or self.stuck_disconnected
        )

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.keys} streams, {self.sent} sent, {self.received} received; "
            f"lost {self.lost}, duplicated {self.duplicated}, at-least-once redeliveries "
            f"{self.at_least_once}, reordered {self.reordered}, misrouted {self.misrouted}, "
            f"pending after drain {self.pending_after_drain}, DISCONNECTED with a live socket "
            f"{self.stuck_disconnected}; {self.seconds:.2f}s"
            + "".join(f"\n  {what}: {count}" for what, count in sorted(self.by_kind.items()))
            + "".join(f"\n  e.g. {example}" for example in self.examples)
        )

    def judge(
        self, key: object, kind: str, got: Iterable[int], count: int, allowed: set[int]
    ) -> None:
        """One stream (a thread, or a thread and a producer) that was sent ``1..count``."""
        seen: set[int] = set()
        last = 0
        self.keys += 1
        self.sent += count
        for n in got:
            self.received += 1
            if n in seen:
                if n in allowed:
                    self.at_least_once += 1
                    self.by_kind[f"at-least-once redeliveries: {kind}"] += 1
                else:
                    self.duplicated += 1
                    self.by_kind[f"duplicated: {kind}"] += 1
                    self.note(f"{key}: {n} received twice")
                continue
            if n < last:
                self.reordered += 1
                self.by_kind[f"reordered: {kind}"] += 1
                self.note(f"{key}: {n} received after {last}")
            seen.add(n)
            last = max(last, n)
        missing = sorted(set(range(1, count + 1)) - seen)
        if missing:
            self.lost += len(missing)
            self.by_kind[f"lost: {kind}"] += len(missing)
            self.note(f"{key}: never received {missing[:10]}")


def check_guard(
    figures: Figures, guard: Guard, manager: ThreadManager, left: int, kinds: dict[str, str]
) -> None:
    stats = guard.stats()
    figures.pending_after_drain = max(left, stats.pending_total)
    for thread in manager.threads:
        state = guard.state(thread)
        if manager.associated(thread) and state is ConnectionState.DISCONNECTED:
            figures.stuck_disconnected += 1
            figures.by_kind[f"DISCONNECTED with a live socket: {kinds[thread]}"] += 1
            pending = stats.pending.get(thread, 0)
            figures.note(f"{thread}: DISCONNECTED with a live socket, {pending} pending")


# -- the async manager: agents, faults, drops and reconnects -------------------------------


@dataclass
class Run:
    thread: str
    user: str
    kind: str
    lag: float
    os_threads: list[threading.Thread]


def associate_from_os_thread(manager: ThreadManager, run: Run) -> None:
    worker = threading.Thread(
        target=manager.update_connection_thread, args=(run.user, run.thread), daemon=True
    )
    run.os_threads.append(worker)
    worker.start()


def sockets_of(manager: ThreadManager, thread: str) -> list[Any]:
    return list(manager.threads.get(thread, ()))


async def agent(manager: ThreadManager, run: Run, rng: random.Random) -> None:
    """Ten events in order; some sends are given up by the caller (``wait_for``)."""
    fault_at = rng.randint(3, EVENTS - 1)
    for n in range(1, EVENTS + 1):
        message = {"thread": run.thread, "n": n}
        send = manager.send_to_thread(run.thread, message)
        give_up = None
        if n == fault_at and run.kind == "transient failure":
            for socket in sockets_of(manager, run.thread):
                socket.fail_next = 1
        elif n == fault_at and run.kind.startswith("slow"):
            for socket in sockets_of(manager, run.thread):
                socket.slow = 0.03
                socket.slow_after_taking = run.kind.startswith("slow ack")
            give_up = 0.005
        elif n == 1 and run.kind.endswith("first send cancelled"):
            give_up = 0.001  # the thread is not associated yet: cancelled on the barrier
        if give_up is None:
            await send
        else:
            with contextlib.suppress(asyncio.TimeoutError):  # the caller moves on
                await asyncio.wait_for(send, give_up)
        await asyncio.sleep(0.001 if n % 3 else 0)


async def handler(manager: ThreadManager, run: Run, rng: random.Random) -> None:
    """The connection side: a late association, then the run's drop and reconnect."""
    await asyncio.sleep(run.lag)
    if run.kind.startswith("associated from an OS thread"):
        associate_from_os_thread(manager, run)
        return
    manager.update_connection_thread(run.user, run.thread)
    if run.kind == "owner drops, reconnects":
        await asyncio.sleep(rng.uniform(0.002, 0.006))
        manager.disconnect_user(run.user)
        await asyncio.sleep(rng.uniform(0.005, 0.03))
        manager.connect(run.user)
        manager.update_connection_thread(run.user, run.thread)
    elif run.kind.startswith("socket dies"):
        await asyncio.sleep(rng.uniform(0.002, 0.006))
        for socket in sockets_of(manager, run.thread):
            socket.close()  # behind the manager's back: it learns on the next send
        await asyncio.sleep(rng.uniform(0.005, 0.03))
        manager.connect(run.user)
        associate_from_os_thread(manager, run)


async def async_side(threads: int, seed: int) -> Figures:
    figures = Figures("async manager")
    rng = random.Random(seed)
    manager = ThreadManager()
    guard = emitguard.guard(manager, disconnect="disconnect_user", name="load-async")
    os_threads: list[threading.Thread] = []
    runs = [
        Run(
            f"a-{i}",
            f"user-{i}",
            KINDS[i % len(KINDS)],
            rng.uniform(0.005, 0.01) if i % len(KINDS) == 8 else rng.uniform(0, 0.01),
            os_threads,
        )
        for i in range(threads)
    ]
    started = time.perf_counter()
    try:
        for run in runs:
            manager.connect(run.user)
        await asyncio.gather(
            *(agent(manager, run, random.Random(rng.random())) for run in runs),
            *(handler(manager, run, random.Random(rng.random())) for run in runs),
        )
        for worker in os_threads:
            await asyncio.to_thread(worker.join)
        left = await guard.drain(5.0)
        figures.seconds = time.perf_counter() - started
        for run in runs:
            sockets = manager.sockets.get(run.thread, [])
            allowed = {m["n"] for socket in sockets for m in socket.cancelled_after_taking}
            got = manager.received(run.thread)
            figures.misrouted += sum(1 for m in got if m["thread"] != run.thread)
            figures.judge(run.thread, run.kind, (m["n"] for m in got), EVENTS, allowed)
        check_guard(figures, guard, manager, left, {run.thread: run.kind for run in runs})
        return figures
    finally:
        emitguard.unguard(manager)
        await guard.aclose()


# -- the sync manager: 4 OS threads sending at once --------------------------------------


def producer(
    manager: SyncThreadManager, index: int, plan: list[str], late: list[str]
) -> Counter[str]:
    """Sends to the threads of ``plan`` in turn (each event numbered per thread and
    producer), as fast as it can; associates its share of the late threads after
    a tenth of the plan. Returns how many it sent to each thread."""
    counters: Counter[str] = Counter()
    mine = late[index::PRODUCERS]
    for step, thread in enumerate(plan):
        if step == len(plan) // 10:
            for name in mine:
                manager.update_connection_thread(f"user-{name}", name)
        counters[thread] += 1
        manager.send_to_thread(thread, {"thread": thread, "producer": index, "n": counters[thread]})
    return counters


async def sync_side(threads: int, sends: int, seed: int) -> Figures:
    """``threads`` threads plus 4 hot ones that get half of every producer's sends."""
    figures = Figures("sync manager, 4 OS threads")
    rng = random.Random(seed)
    manager = SyncThreadManager()
    # No cap can be reached: four producers outrunning the loop's flushes must not drop.
    guard = emitguard.guard(
        manager,
        disconnect="disconnect_user",
        name="load-sync",
        max_per_thread=10**7,
        max_total=10**8,
    )
    hot = [f"hot-{i}" for i in range(4)]
    names = hot + [f"s-{i}" for i in range(threads)]
    late = names[len(names) // 2 :]
    plans = [
        [hot[rng.randrange(4)] if rng.random() < 0.9 else rng.choice(names) for _ in range(sends)]
        for _ in range(PRODUCERS)
    ]
    started = time.perf_counter()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the GIL may switch anywhere: let it, often
    try:
        kinds: dict[str, str] = {}
        for thread in names:
            socket = manager.connect(f"user-{thread}")
            if thread not in hot and rng.random() < 0.05:
                socket.fail_next = 1
            kinds[thread] = (
                "hot" if thread in hot else "fails once" if socket.fail_next else "plain"
            )
            kinds[thread] += ", associated late" if thread in late else ""
        for thread in names[: len(names) // 2]:
            manager.update_connection_thread(f"user-{thread}", thread)
        sent = await asyncio.gather(
            *(
                asyncio.to_thread(producer, manager, index, plans[index], late)
                for index in range(PRODUCERS)
            )
        )
        sys.setswitchinterval(switch)
        left = await guard.drain(5.0)
        figures.seconds = time.perf_counter() - started
        for thread in names:
            got = manager.received(thread)
            figures.misrouted += sum(1 for m in got if m["thread"] != thread)
            for index in range(PRODUCERS):
                mine = (m["n"] for m in got if m["producer"] == index)
                figures.judge((thread, index), kinds[thread], mine, sent[index][thread], set())
        check_guard(figures, guard, manager, left, kinds)
        return figures
    finally:
        sys.setswitchinterval(switch)
        emitguard.unguard(manager)
        await guard.aclose()


async def test_load_and_faults_lose_nothing(scale: float) -> None:
    async_figures, sync_figures = await asyncio.gather(
        async_side(int(2000 * scale), seed=10),
        sync_side(int(200 * scale), int(5000 * scale), seed=11),
    )
    print(f"\nload and faults, scale {scale:g}:\n{async_figures}\n{sync_figures}")
    assert async_figures.ok(), str(async_figures)
    assert sync_figures.ok(), str(sync_figures)
