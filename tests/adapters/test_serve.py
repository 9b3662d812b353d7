"""``emitguard_adapters.testing.serve``: uvicorn on a socket bound before it starts."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from emitguard_adapters import testing


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


APP = Starlette(routes=[Route("/", hello)])


async def test_serves_on_the_socket_it_bound_first(monkeypatch: pytest.MonkeyPatch) -> None:
    bound: list[socket.socket] = []
    original = testing.bound_socket

    def record(host: str = "127.0.0.1") -> socket.socket:
        sock = original(host)
        bound.append(sock)
        return sock

    monkeypatch.setattr(testing, "bound_socket", record)
    async with testing.serve(APP) as address, httpx.AsyncClient() as client:
        [sock] = bound
        assert address == f"127.0.0.1:{sock.getsockname()[1]}"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1  # uvicorn listens
        response = await client.get(f"http://{address}/")
        assert response.text == "hello"
    assert sock.fileno() == -1  # closed with the server


async def test_parallel_servers_get_their_own_ports() -> None:
    async def one() -> tuple[str, str]:
        async with testing.serve(APP) as address, httpx.AsyncClient() as client:
            response = await client.get(f"http://{address}/")
            return address, response.text

    results = await asyncio.gather(*(one() for _ in range(8)))
    assert len({address for address, _ in results}) == 8
    assert {text for _, text in results} == {"hello"}


def test_bound_socket_holds_its_port() -> None:
    with testing.bound_socket() as sock:
        port = sock.getsockname()[1]
        assert port > 0
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", port))


async def test_a_server_that_fails_to_start_raises() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("unused")

    class FailingConfig(testing.uvicorn.Config):
        def load(self) -> None:
            raise RuntimeError("cannot load the app")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(testing.uvicorn, "Config", FailingConfig)
        with pytest.raises(RuntimeError, match="cannot load the app"):
            async with testing.serve(broken):
                pass


async def test_overlapping_servers_leave_the_process_its_own_signal_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    first = testing.serve(APP)
    second = testing.serve(APP)
    await first.__aenter__()
    await second.__aenter__()
    live = signal.getsignal(signal.SIGTERM)
    assert getattr(live, "__self__", None) is not None  # the newest server takes the signal
    await first.__aexit__(None, None, None)  # they end in the order they started
    assert signal.getsignal(signal.SIGTERM) == live  # the live one still takes it
    await second.__aexit__(None, None, None)
    # (uvicorn's own server would leave the first one's handler here: a server that exited)
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.getsignal(signal.SIGINT) is not live  # Ctrl+C interrupts the process again

