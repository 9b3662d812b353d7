"""The pytest plugin, run in real pytest sessions with pytester."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

RACE = """
import asyncio

import pytest

import emitguard

EVENTS = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]


async def run_agent(manager, thread_id):
    for kind in EVENTS:
        await manager.send_to_thread(thread_id, {"type": kind})


async def start_agent(manager, user, thread_id, lag):
    agent = asyncio.create_task(run_agent(manager, thread_id))
    await asyncio.sleep(lag)
    manager.update_connection_thread(user, thread_id)
    await agent
"""


ASYNCIO = ("-p", "asyncio", "-o", "asyncio_default_fixture_loop_scope=function")


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_suite=RACE + source)
    return pytester.runpytest(*ASYNCIO, "-o", "asyncio_mode=auto", *args)


def test_guarded_agent_run_passes(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
async def test_guarded(reference_manager, emitguard_guard, emissions):
    emitguard_guard(reference_manager, disconnect="disconnect_user")
    reference_manager.connect("u1")
    await start_agent(reference_manager, "u1", "t-1", lag=0.01)
    emissions.assert_delivered(*EVENTS, thread="t-1")
    emissions.assert_no_failures()
    emissions.assert_no_gaps("t-1")
    emissions.assert_no_duplicates()
    assert emissions.types("t-1") == EVENTS
    assert len(emissions.by_thread("t-1")) == 5
    assert emissions.by_outcome("delivered")[0].waited > 0
    assert emissions.by_type("agent_started")[0].seq == 1
""",
    )
    result.assert_outcomes(passed=1)


def test_lost_events_fail_the_test_with_a_readable_report(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
async def test_lossy(reference_manager, emitguard_guard, emissions):
    emitguard_guard(reference_manager, max_per_thread=2, on_unready="buffer")
    reference_manager.connect("u1")
    await run_agent(reference_manager, "t-1")  # never associated
""",
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*emitguard: 5 emissions did not reach their thread",
            "- thread t-1 seq 1 agent_started: DROPPED (outbox full, max_per_thread=2, evicted*",
            "- thread t-1 seq 2 agent_thinking: DROPPED (*",
            "- thread t-1 seq 3 tool_executing: DROPPED (*",
            "- thread t-1 seq 4 tool_completed: BUFFERED (thread not associated yet*",
            "- thread t-1 seq 5 agent_completed: BUFFERED (*",
            "",
            "If this is expected, allow it: @pytest.mark.emitguard(allow=('buffered', 'dropped'))",
        ]
    )


def test_marker_allow_and_drain_timeout(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
@pytest.mark.emitguard(allow=("buffered", "DROPPED"), drain_timeout=0.1)
async def test_allowed(reference_manager, emitguard_guard, emissions):
    emitguard_guard(reference_manager, max_per_thread=2, on_unready="buffer")
    await run_agent(reference_manager, "t-1")
""",
    )
    result.assert_outcomes(passed=1)


def test_teardown_drain_delivers_what_became_deliverable(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
def test_sync_code(reference_manager, emitguard_guard, emissions):
    emitguard_guard(reference_manager, on_unready="buffer")
    socket = reference_manager.connect("u1")
    asyncio.run(reference_manager.send_to_thread("t-1", {"type": "agent_started"}))
    reference_manager.update_connection_thread("u1", "t-1")
    assert socket.received == [{"type": "agent_started"}]
""",
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("allow=('lost',)", "unknown outcome 'lost'"),
        ("alow=('dropped',)", "unknown option(s) 'alow'; options: allow, drain_timeout, strict"),
        ("allow=('delivered',)", "allow takes bad outcomes only, got delivered"),
        ("drain_timeout=-1", "drain_timeout must be >= 0, got -1"),
        ("'dropped'", "takes keyword options only"),
    ],
)
def test_marker_options_are_validated(pytester: pytest.Pytester, marker: str, message: str) -> None:
    result = run(
        pytester,
        f"""
@pytest.mark.emitguard({marker})
def test_marked(emissions):
    pass
""",
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*@pytest.mark.emitguard*{message}*"])


STRICT_SUITE = """
async def test_unguarded_path_lost(reference_manager, emitguard_guard):
    emitguard_guard(reference_manager, on_unready="buffer")
    await reference_manager.send_to_thread("t-9", {"type": "agent_started"})
"""


def test_strict_mode_by_option(pytester: pytest.Pytester) -> None:
    run(pytester, STRICT_SUITE).assert_outcomes(passed=1)
    result = pytester.runpytest(*ASYNCIO, "-o", "asyncio_mode=auto", "--emitguard-strict")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*thread t-9 seq 1 agent_started: BUFFERED*"])


def test_strict_mode_by_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nemitguard_strict = true\nasyncio_mode = auto\n")
    pytester.makepyfile(test_suite=RACE + STRICT_SUITE)
    result = pytester.runpytest(*ASYNCIO)
    result.assert_outcomes(passed=1, errors=1)


def test_marker_alone_turns_the_check_on(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
@pytest.mark.emitguard
async def test_marked(reference_manager, emitguard_guard):
    emitguard_guard(reference_manager, on_unready="buffer")
    await reference_manager.send_to_thread("t-1", {"type": "x"})
""",
    )
    result.assert_outcomes(passed=1, errors=1)


def test_guard_factory_unguards_even_when_the_test_fails(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
from emitguard.testing import ReferenceManager

SHARED = ReferenceManager()


def test_fails(emitguard_guard):
    emitguard_guard(SHARED)
    assert emitguard.guarded(SHARED) is not None
    raise AssertionError("boom")


def test_after():
    assert emitguard.guarded(SHARED) is None
    assert "GuardedMethod" not in type(vars(SHARED).get("send_to_thread", object())).__name__
""",
    )
    result.assert_outcomes(passed=1, failed=1)


@pytest.mark.parametrize(
    "plugins",
    [
        (*ASYNCIO, "-o", "asyncio_mode=auto"),
        (*ASYNCIO, "-o", "asyncio_mode=strict"),
        (
            "-p",
            "no:asyncio",
        ),
    ],
    ids=["asyncio-auto", "asyncio-strict", "no-asyncio"],
)
def test_works_with_and_without_async_plugins(
    pytester: pytest.Pytester, plugins: tuple[str, ...]
) -> None:
    pytester.makepyfile(
        test_suite=RACE
        + """
import pytest


@pytest.mark.anyio
async def test_with_anyio(reference_manager, emitguard_guard, emissions):
    emitguard_guard(reference_manager)
    reference_manager.connect("u1")
    await start_agent(reference_manager, "u1", "t-1", lag=0.005)
    emissions.assert_delivered(*EVENTS, thread="t-1")


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_loop_driven_by_hand(reference_manager, emitguard_guard, emissions):
    emitguard_guard(reference_manager)
    reference_manager.connect("u1")
    asyncio.run(start_agent(reference_manager, "u1", "t-1", lag=0.005))
    emissions.assert_delivered(*EVENTS, thread="t-1")
"""
    )
    result = pytester.runpytest(*plugins)
    result.assert_outcomes(passed=2)


def test_assertion_messages(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
@pytest.mark.emitguard(allow=("buffered",))
async def test_messages(reference_manager, emitguard_guard, emissions):
    emitguard_guard(reference_manager, on_unready="buffer")
    await reference_manager.send_to_thread("t-1", {"type": "a"})
    with pytest.raises(AssertionError, match="not delivered to thread t-1: a; delivered: nothing"):
        emissions.assert_delivered("a", thread="t-1")
    emissions.assert_no_failures()
    with pytest.raises(ValueError, match="unknown outcome 'nope'"):
        emissions.by_outcome("nope")
""",
    )
    result.assert_outcomes(passed=1)


def test_a_guard_from_an_earlier_test_does_not_fail_the_next_one(pytester: pytest.Pytester) -> None:
    """Found in review: the teardown drained every live guard, so an earlier test's allowed
    leftovers expired into a later test's ledger."""
    result = run(
        pytester,
        """
import time


@pytest.mark.emitguard(allow=("buffered", "expired"))
async def test_a(reference_manager, emitguard_guard, emissions):
    emitguard_guard(reference_manager, on_unready="buffer", ttl=0.05)
    await reference_manager.send_to_thread("t-A", {"type": "agent_started"})


def test_b(emissions):
    time.sleep(0.1)
""",
    )
    result.assert_outcomes(passed=2)


def test_marker_strict_false_opts_out_of_strict_mode(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_suite=RACE
        + """
@pytest.mark.emitguard(strict=False)
async def test_opted_out(reference_manager, emitguard_guard):
    emitguard_guard(reference_manager, on_unready="buffer")
    await reference_manager.send_to_thread("t-2", {"type": "x"})
"""
    )
    result = pytester.runpytest(*ASYNCIO, "-o", "asyncio_mode=auto", "--emitguard-strict")
    result.assert_outcomes(passed=1)
