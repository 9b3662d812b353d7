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
async def test_guarded(emitguard_manager, emitguard_guard, emitguard_emissions):
    emitguard_guard(emitguard_manager, disconnect="disconnect_user")
    emitguard_manager.connect("u1")
    await start_agent(emitguard_manager, "u1", "t-1", lag=0.01)
    emitguard_emissions.assert_delivered(*EVENTS, thread="t-1")
    emitguard_emissions.assert_no_failures()
    emitguard_emissions.assert_no_gaps("t-1")
    emitguard_emissions.assert_no_duplicates()
    assert emitguard_emissions.types("t-1") == EVENTS
    assert len(emitguard_emissions.by_thread("t-1")) == 5
    assert emitguard_emissions.by_outcome("delivered")[0].waited > 0
    assert emitguard_emissions.by_type("agent_started")[0].seq == 1
""",
    )
    result.assert_outcomes(passed=1)


def test_lost_events_fail_the_test_with_a_readable_report(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
async def test_lossy(emitguard_manager, emitguard_guard, emitguard_emissions):
    emitguard_guard(emitguard_manager, max_per_thread=2, on_unready="buffer")
    emitguard_manager.connect("u1")
    await run_agent(emitguard_manager, "t-1")  # never associated
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
async def test_allowed(emitguard_manager, emitguard_guard, emitguard_emissions):
    emitguard_guard(emitguard_manager, max_per_thread=2, on_unready="buffer")
    await run_agent(emitguard_manager, "t-1")
""",
    )
    result.assert_outcomes(passed=1)


def test_teardown_drain_delivers_what_became_deliverable(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
def test_sync_code(emitguard_manager, emitguard_guard, emitguard_emissions):
    emitguard_guard(emitguard_manager, on_unready="buffer")
    socket = emitguard_manager.connect("u1")
    asyncio.run(emitguard_manager.send_to_thread("t-1", {"type": "agent_started"}))
    emitguard_manager.update_connection_thread("u1", "t-1")
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
def test_marked(emitguard_emissions):
    pass
""",
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*@pytest.mark.emitguard*{message}*"])


STRICT_SUITE = """
async def test_unguarded_path_lost(emitguard_manager, emitguard_guard):
    emitguard_guard(emitguard_manager, on_unready="buffer")
    await emitguard_manager.send_to_thread("t-9", {"type": "agent_started"})
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
async def test_marked(emitguard_manager, emitguard_guard):
    emitguard_guard(emitguard_manager, on_unready="buffer")
    await emitguard_manager.send_to_thread("t-1", {"type": "x"})
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
async def test_with_anyio(emitguard_manager, emitguard_guard, emitguard_emissions):
    emitguard_guard(emitguard_manager)
    emitguard_manager.connect("u1")
    await start_agent(emitguard_manager, "u1", "t-1", lag=0.005)
    emitguard_emissions.assert_delivered(*EVENTS, thread="t-1")


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_loop_driven_by_hand(emitguard_manager, emitguard_guard, emitguard_emissions):
    emitguard_guard(emitguard_manager)
    emitguard_manager.connect("u1")
    asyncio.run(start_agent(emitguard_manager, "u1", "t-1", lag=0.005))
    emitguard_emissions.assert_delivered(*EVENTS, thread="t-1")
"""
    )
    result = pytester.runpytest(*plugins)
    result.assert_outcomes(passed=2)


def test_assertion_messages(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
@pytest.mark.emitguard(allow=("buffered",))
async def test_messages(emitguard_manager, emitguard_guard, emitguard_emissions):
    emitguard_guard(emitguard_manager, on_unready="buffer")
    await emitguard_manager.send_to_thread("t-1", {"type": "a"})
    with pytest.raises(AssertionError, match="not delivered to thread t-1: a; delivered: nothing"):
        emitguard_emissions.assert_delivered("a", thread="t-1")
    emitguard_emissions.assert_no_failures()
    with pytest.raises(ValueError, match="unknown outcome 'nope'"):
        emitguard_emissions.by_outcome("nope")
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
async def test_a(emitguard_manager, emitguard_guard, emitguard_emissions):
    emitguard_guard(emitguard_manager, on_unready="buffer", ttl=0.05)
    await emitguard_manager.send_to_thread("t-A", {"type": "agent_started"})


def test_b(emitguard_emissions):
    time.sleep(0.1)
""",
    )
    result.assert_outcomes(passed=2)


def test_marker_strict_false_opts_out_of_strict_mode(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_suite=RACE
        + """
@pytest.mark.emitguard(strict=False)
async def test_opted_out(emitguard_manager, emitguard_guard):
    emitguard_guard(emitguard_manager, on_unready="buffer")
    await emitguard_manager.send_to_thread("t-2", {"type": "x"})
"""
    )
    result = pytester.runpytest(*ASYNCIO, "-o", "asyncio_mode=auto", "--emitguard-strict")
    result.assert_outcomes(passed=1)


# ------------------------------------------------------------------ opt-in only

UNRELATED_SUITE = """
import pytest


@pytest.fixture
def emissions():
    return ["the project's own"]


@pytest.fixture
def reference_manager():
    return "the project's own"


def test_own_fixtures(emissions, reference_manager):
    assert emissions == ["the project's own"]
    assert reference_manager == "the project's own"


@pytest.mark.parametrize("n", [1, 2])
def test_plain(n):
    assert n
"""


def test_a_project_that_did_not_opt_in_gets_no_emitguard_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_unrelated=UNRELATED_SUITE)
    result = pytester.runpytest("-p", "no:asyncio", "--setup-show")
    result.assert_outcomes(passed=3)
    setup_lines = [line for line in result.outlines if "SETUP" in line]
    assert setup_lines, result.outlines
    assert not [line for line in setup_lines if "emitguard" in line]


def test_strict_mode_checks_tests_that_have_their_own_emissions_fixture(
    pytester: pytest.Pytester,
) -> None:
    """Found in issue 15: a project fixture named ``emissions`` used to switch strict mode off
    for its tests; the prefixed names cannot collide with it."""
    pytester.makepyfile(
        test_suite=RACE
        + UNRELATED_SUITE
        + """

async def test_lost_with_own_fixture(emissions, emitguard_manager, emitguard_guard):
    emitguard_guard(emitguard_manager, on_unready="buffer")
    await emitguard_manager.send_to_thread("t-1", {"type": "agent_started"})
"""
    )
    result = pytester.runpytest(*ASYNCIO, "-o", "asyncio_mode=auto", "--emitguard-strict")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_lost_with_own_fixture*", "*seq 1 agent_started: BUFFERED*"]
    )


def test_strict_mode_sees_what_other_fixtures_emit(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
@pytest.fixture
async def greeted(emitguard_manager, emitguard_guard):
    emitguard_guard(emitguard_manager, on_unready="buffer")
    await emitguard_manager.send_to_thread("t-1", {"type": "hello"})  # never associated
    return emitguard_manager


def test_uses_it(greeted):
    pass
""",
        "--emitguard-strict",
        "--setup-show",
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*SETUP    F emitguard_emissions*", "*seq 1 hello: BUFFERED*"])


def test_the_marker_on_one_parameter_checks_that_one_only(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
@pytest.mark.parametrize(
    "thread", ["t-plain", pytest.param("t-marked", marks=pytest.mark.emitguard)]
)
async def test_lost(emitguard_manager, emitguard_guard, thread):
    emitguard_guard(emitguard_manager, on_unready="buffer")
    await emitguard_manager.send_to_thread(thread, {"type": "agent_started"})
""",
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_lost[[]t-marked[]]*"])
    assert "thread t-plain" not in result.stdout.str()
