"""docs/fastapi_app.py over real sockets: the report's race, fixed by the one-line guard."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect

import emitguard
from conftest import Records
from emitguard import Outcome
from emitguard_adapters.testing import serve

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "fastapi_app.py"


@pytest.fixture
def example() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("emitguard_docs_fastapi_app", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        if hasattr(module, "manager"):
            emitguard.unguard(module.manager)


def expected(steps: int) -> list[dict[str, Any]]:
    updates = [{"type": "agent_update", "step": step} for step in range(steps)]
    return [{"type": "agent_started"}, *updates, {"type": "agent_completed"}]


async def one_run(address: str, thread_id: str, steps: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with connect(f"ws://{address}/ws") as ws:
        await ws.send(
            json.dumps({"user_id": f"user-{thread_id}", "thread_id": thread_id, "steps": steps})
        )
        while not got or got[-1]["type"] != "agent_completed":
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 3)))
    return got


async def test_every_event_of_every_run_arrives_in_order(
    example: ModuleType, records: Records
) -> None:
    records.guard = example.guard
    assert emitguard.guarded(example.manager) is example.guard
    async with serve(example.app) as address:
        runs = await asyncio.gather(*(one_run(address, f"t{i}", 4) for i in range(5)))
    assert runs == [expected(4)] * 5
    assert example.manager.lost == 0
    assert records.outcomes() == [Outcome.DELIVERED] * (5 * len(expected(4)))


async def test_a_later_message_starts_another_run_on_the_same_thread(
    example: ModuleType,
) -> None:
    async with serve(example.app) as address, connect(f"ws://{address}/ws") as ws:
        await ws.send(json.dumps({"user_id": "u1", "thread_id": "t1", "steps": 1}))
        first = [json.loads(await asyncio.wait_for(ws.recv(), 3)) for _ in range(3)]
        await ws.send(json.dumps({"steps": 2}))
        second = [json.loads(await asyncio.wait_for(ws.recv(), 3)) for _ in range(4)]
    assert (first, second) == (expected(1), expected(2))
    assert example.manager.lost == 0
