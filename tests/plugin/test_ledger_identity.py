"""The ``emitguard_emissions`` ledger tells guards apart by identity, not by name (issue 10).

Two instances of one manager class, each guarded, get guards that may share a name. Their
emissions to one thread id share ``(thread, seq)``; the ledger must still see two emissions,
not one delivered twice or one that hides the other's loss.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

ASYNCIO = ("-p", "asyncio", "-o", "asyncio_default_fixture_loop_scope=function")

HEADER = """
import pytest

from emitguard.testing import ReferenceManager


async def deliver_first_event(manager, thread_id):
    manager.connect("u1")
    manager.update_connection_thread("u1", thread_id)
    assert await manager.send_to_thread(thread_id, {"type": "agent_started"})
"""


def run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makepyfile(test_suite=HEADER + source)
    return pytester.runpytest(*ASYNCIO, "-o", "asyncio_mode=auto")


def test_a_loss_on_one_of_two_same_class_guards_fails_the_test(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
@pytest.mark.emitguard(drain_timeout=0.1)
async def test_two_managers(emitguard_guard, emitguard_emissions):
    lossy, healthy = ReferenceManager(), ReferenceManager()
    emitguard_guard(lossy, on_unready="buffer")
    emitguard_guard(healthy)
    await lossy.send_to_thread("t-1", {"type": "agent_started"})  # never associated
    await deliver_first_event(healthy, "t-1")  # the same thread id and seq, delivered
    assert lossy.received("t-1") == []
""",
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*emitguard: 1 emission did not reach its thread",
            "- thread t-1 seq 1 agent_started: BUFFERED (*",
        ]
    )


def test_the_same_seq_from_two_same_class_guards_is_not_a_duplicate(
    pytester: pytest.Pytester,
) -> None:
    result = run(
        pytester,
        """
async def test_two_managers(emitguard_guard, emitguard_emissions):
    first, second = ReferenceManager(), ReferenceManager()
    emitguard_guard(first)
    emitguard_guard(second)
    await deliver_first_event(first, "t-1")
    await deliver_first_event(second, "t-1")
    emitguard_emissions.assert_no_duplicates()
    emitguard_emissions.assert_no_gaps("t-1")
    emitguard_emissions.assert_no_failures()
    assert len(emitguard_emissions.final()) == 2
    assert emitguard_emissions.types("t-1") == ["agent_started", "agent_started"]
""",
    )
    result.assert_outcomes(passed=1)
