"""The shared access rules: one thread-id pattern, close reasons, authorize in a thread."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emitguard_adapters import fallback, starlette
from emitguard_adapters._access import THREAD_ID, authorized, close_reason
from emitguard_adapters.fallback import emitguard_routes
from emitguard_adapters.starlette import ThreadHub, allow_any


def test_the_hub_and_the_routes_share_one_thread_pattern() -> None:
    assert fallback.THREAD_ID is starlette.THREAD_ID is THREAD_ID
    for call in (ThreadHub, emitguard_routes):
        assert inspect.signature(call).parameters["thread_pattern"].default is THREAD_ID


@given(st.text(min_size=0, max_size=300))
def test_a_close_reason_is_always_valid_utf8_of_at_most_123_bytes(text: str) -> None:
    reason = close_reason(text)
    assert len(reason.encode("utf-8")) <= 123  # encodes: no lone surrogate is left
    if len(text.encode("utf-8", "backslashreplace")) <= 123:
        assert reason == text.encode("utf-8", "backslashreplace").decode()
    else:
        assert reason.endswith("...")


def test_a_lone_surrogate_is_written_as_its_escape() -> None:
    assert close_reason("not allowed to read thread a\ud800") == (
        "not allowed to read thread a\\ud800"
    )
    assert close_reason("é" * 100).endswith("é...")


def test_hub_options_are_checked() -> None:
    with pytest.raises(ValueError, match="queue_size must be an int >= 1, got 0"):
        ThreadHub(authorize=allow_any, queue_size=0)
    with pytest.raises(ValueError, match="send_timeout must be a number of seconds > 0, got 0"):
        ThreadHub(authorize=allow_any, send_timeout=0)
    with pytest.raises(ValueError, match=r"authorize_timeout must be .* got True"):
        ThreadHub(authorize=allow_any, authorize_timeout=True)
    guard = ThreadHub(authorize=allow_any).guard
    with pytest.raises(ValueError, match=r"send_timeout must be .* got -1"):
        emitguard_routes(guard, authorize=allow_any, send_timeout=-1)


async def test_a_sync_authorize_runs_in_a_worker_thread_and_an_async_one_on_the_loop() -> None:
    seen: list[str] = []

    def sync(subject: Any, thread_id: str) -> bool:
        seen.append(threading.current_thread().name)
        return True

    async def run_async(subject: Any, thread_id: str) -> bool:
        seen.append(threading.current_thread().name)
        return True

    class Callable:
        async def __call__(self, subject: Any, thread_id: str) -> bool:
            seen.append(threading.current_thread().name)
            return True

    for authorize in (sync, run_async, Callable()):
        assert await authorized(authorize, None, "t1", 1.0)
    main = threading.current_thread().name
    assert seen[0] != main
    assert seen[1:] == [main, main]


async def test_only_true_allows_and_a_slow_answer_refuses() -> None:
    assert not await authorized(lambda s, t: 1, None, "t1", 1.0)
    assert not await authorized(lambda s, t: time.sleep(0.5) or True, None, "t1", 0.05)

    async def awaitable_from_sync() -> bool:
        return True

    assert await authorized(lambda s, t: awaitable_from_sync(), None, "t1", 1.0)
    await asyncio.sleep(0.5)  # let the abandoned worker thread finish
