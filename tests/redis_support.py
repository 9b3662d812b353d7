"""Real ``redis-server`` processes for the Redis backend's tests, each on a free port in a
temporary directory, that a test may kill (``-9``), pause (``SIGSTOP``/``SIGCONT``) and
restart (from its AOF, or empty). The shared server on 6379 is never touched.

``redis_server`` (a fixture, :func:`serve`) gives a running :class:`RedisServer`; tests are
skipped when no ``redis-server`` binary is installed. ``EMITGUARD_REDIS_SCALE`` (default
1.0) scales the counts of the multi-process tests (CI may set 0.3).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SCALE = float(os.environ.get("EMITGUARD_REDIS_SCALE", "1.0"))
"""How much of the full counts the multi-process Redis tests run."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` of a test."""

    def __init__(self, directory: Path, *, appendfsync: str | None = "always") -> None:
        self.directory = directory
        self.port = free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, appendfsync: str | bool | None = False) -> None:
        """Start (again, on the same port and directory); ``appendfsync`` None: no
        persistence at all (and what was saved is wiped)."""
        if appendfsync is not False:
            self.appendfsync = appendfsync  # type: ignore[assignment]
        args = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.appendfsync is None:
            for leftover in self.directory.glob("appendonly*"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            args += ["--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        self.wait_up()

    def wait_up(self, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.port} did not come up")

    def kill(self) -> None:
        """``kill -9``."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.kill()


def serve(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of one test (AOF with ``appendfsync always``), stopped after it
    (the ``redis_server`` fixture of ``conftest.py``)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
