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
import sys
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
        self.wait_for(self.port, seconds)

    @staticmethod
    def wait_for(port: int, seconds: float = 10.0) -> None:
        """Wait until the ``redis-server`` on ``port`` answers PING."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), 0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {port} did not come up")

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


class RedisCluster:
    """A Redis Cluster of a test: ``nodes`` masters (no replicas), each a ``redis-server``
    with ``cluster-enabled yes`` on a free port (its bus on another free port, set with
    ``cluster-port``), joined by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        self.directory = directory
        self.ports = [free_port() for _ in range(nodes)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The URL of one node, for a cluster client (it discovers the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for port in self.ports:
            home = self.directory / f"node-{port}"
            home.mkdir()
            args = [
                shutil.which("redis-server") or "redis-server",
                "--port", str(port),
                "--cluster-port", str(free_port()),
                "--bind", "127.0.0.1",
                "--dir", str(home),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(home / "nodes.conf"),
                "--save", "",
                "--appendonly", "no",
                "--logfile", str(home / "redis.log"),
            ]  # fmt: skip
            self.processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        for port in self.ports:
            RedisServer.wait_for(port)
        create = [shutil.which("redis-cli") or "redis-cli", "--cluster", "create"]
        create += [f"127.0.0.1:{port}" for port in self.ports]
        create += ["--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while not all(self._ok(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster on {self.ports} did not become ok")
            time.sleep(0.1)

    @staticmethod
    def _ok(port: int) -> bool:
        with socket.create_connection(("127.0.0.1", port), 1) as conn:
            conn.sendall(b"CLUSTER INFO\r\n")
            return b"cluster_state:ok" in conn.recv(4096)

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        self.processes = []


def serve_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A 3-node Redis Cluster of one test, stopped after it (the ``redis_cluster`` fixture)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed")
    pytest.importorskip("redis")
    cluster = RedisCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class AppWorker:
    """A worker script (``tests/redis_hub_worker.py``, ``tests/redis_sio_worker.py``) in a
    process of its own, on a free port: ``script <url> <port> *args``."""

    def __init__(self, script: Path, url: str, *args: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(script), url, str(self.port), *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready", "the worker did not start"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """``kill -9``."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
