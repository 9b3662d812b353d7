"""``replay_to(..., wire=...)``: a replayed event goes out in the manager's own wire format
(issue 15: an app wrapping events in ``{"event": ..., "data": ...}`` got its replays bare)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect

import emitguard
from emitguard_adapters.starlette import EmitGuardMiddleware, replay_to
from emitguard_adapters.testing import serve


def wrap(message: dict[str, Any]) -> dict[str, Any]:
    """The app's wire format: the event's name beside its data."""
    return {"event": message["type"], "data": message}


class WrappingManager:
    """A manager whose send wraps each message before writing it."""

    def __init__(self) -> None:
        self.sockets: dict[str, WebSocket] = {}

    def associate(self, thread_id: str, websocket: WebSocket) -> None:
        self.sockets[thread_id] = websocket

    def disconnect(self, websocket: WebSocket) -> None:
        for thread_id, known in list(self.sockets.items()):
            if known is websocket:
                del self.sockets[thread_id]

    async def send_to_thread(self, thread_id: str, message: dict[str, Any]) -> bool:
        websocket = self.sockets.get(thread_id)
        if websocket is None:
            return False
        await websocket.send_json(wrap(message))
        return True


def app(manager: WrappingManager, guard: emitguard.Guard, wired: bool) -> Any:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        hello = await websocket.receive_json()
        async with guard.hold("t1"):
            if hello.get("last_seq") is not None:
                kwargs = {"wire": wrap} if wired else {}
                await replay_to(websocket, guard, "t1", hello["last_seq"], **kwargs)
            manager.associate("t1", websocket)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            manager.disconnect(websocket)

    return EmitGuardMiddleware(Starlette(routes=[WebSocketRoute("/ws", endpoint)]), guard=guard)


async def frames(address: str, hello: dict[str, Any], count: int) -> list[dict[str, Any]]:
    async with connect(f"ws://{address}/ws") as ws:
        await ws.send(json.dumps(hello))
        return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(count)]


async def replayed(wired: bool, last_seq: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """Live frames of a first client, and what a second one is replayed after ``last_seq``."""
    manager = WrappingManager()
    guard = emitguard.guard(
        manager, stamp_seq="seq", history=2, associate="associate", disconnect="disconnect"
    )
    try:
        async with serve(app(manager, guard, wired)) as address:
            async with connect(f"ws://{address}/ws") as ws:
                await ws.send(json.dumps({}))
                await guard.wait_ready("t1", 5)
                for kind in ("agent_started", "agent_thinking", "agent_completed"):
                    assert await manager.send_to_thread("t1", {"type": kind})
                live = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
            again = await frames(address, {"last_seq": last_seq}, 2 if last_seq else 1)
    finally:
        await guard.aclose()
        emitguard.unguard(manager)
    return live, again


async def test_replayed_events_go_out_in_the_managers_wire_format() -> None:
    live, again = await replayed(wired=True, last_seq=1)
    assert [frame["event"] for frame in live] == [
        "agent_started", "agent_thinking", "agent_completed"
    ]  # fmt: skip
    assert again == live[1:]  # the same frames, seq and wrapping included


async def test_without_wire_the_replay_is_the_message_as_handed_to_the_send() -> None:
    live, again = await replayed(wired=False, last_seq=1)
    assert again == [frame["data"] for frame in live[1:]]


async def test_the_resync_message_is_wrapped_too() -> None:
    _, again = await replayed(wired=True, last_seq=0)  # the window (2) lost seq 1
    [told] = again
    assert told["event"] == "resync"
    assert told["data"]["recovered"] is False
