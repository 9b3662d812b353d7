"""Serve a benchmark's apps in a child process, as production does: clients are never in it.

With clients and servers in one process, the figures measured the client as much as the
server, and worse, the TCP exchange between the two in one event loop: on this machine the
bare legacy server's frames reached each client about 9 to a read while the guarded server's
arrived one to a read (the same bytes, the same number of loop iterations), so the guarded
run paid for ten times as many client reads and looked 25% slower while its server did 5% more
work. In a child process the server has a core of its own and its CPU time is measured
directly (``/proc/<pid>/stat``), next to the events/s the clients see.

The child imports ``module``, calls ``module.<factory>()`` for a dict of name -> ASGI app,
serves each under uvicorn on loopback, prints one JSON line of name -> "host:port", and serves
until its stdin closes; then it prints one JSON line of ``module.<report>()`` if that exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent


class ServerProcess:
    """A running child process serving named apps; ``cpu()`` is its user+system CPU seconds."""

    def __init__(self, process: subprocess.Popen[str], addresses: dict[str, str]) -> None:
        self.process = process
        self.addresses = addresses
        self.report: Any = None
        self._tick = os.sysconf("SC_CLK_TCK")

    def pin(self) -> str:
        """Put the server process on one CPU and this (client) process on the others, so
        the two never take each other's core or migrate mid-round (Linux, 2+ CPUs; a note
        of what was done)."""
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:
            return "not pinned (no sched_setaffinity here)"
        if len(cpus) < 2:
            return "not pinned (one CPU)"
        os.sched_setaffinity(self.process.pid, {cpus[-1]})
        os.sched_setaffinity(0, set(cpus[:-1]))
        return f"server pinned to CPU {cpus[-1]}, clients to {cpus[:-1]}"

    def cpu(self) -> float:
        """CPU seconds the server process has used so far (Linux; 0.0 elsewhere)."""
        user, system = self.cpu_split()
        return user + system

    def cpu_split(self) -> tuple[float, float]:
        """User and system CPU seconds of the server process so far (Linux; zeros elsewhere)."""
        try:
            with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0, 0.0
        return int(fields[11]) / self._tick, int(fields[12]) / self._tick


@contextlib.contextmanager
def serving(module: str, factory: str, *args: str) -> Iterator[ServerProcess]:
    """Start ``python benchmarks/_server_process.py module factory args...`` and wait for its
    addresses; on exit close its stdin, collect its report and wait for it."""
    process = subprocess.Popen(
        [sys.executable, str(_HERE / "_server_process.py"), module, factory, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=_HERE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process exited with {process.wait()}")
        server = ServerProcess(process, json.loads(line))
        yield server
        process.stdin.close()
        last = process.stdout.readline()
        server.report = json.loads(last) if last.strip() else None
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _serve(module_name: str, factory: str, args: list[str]) -> None:
    from emitguard_adapters.testing import serve

    module = importlib.import_module(module_name)
    apps: dict[str, Any] = getattr(module, factory)(*args)
    async with contextlib.AsyncExitStack() as stack:
        addresses = {
            name: await stack.enter_async_context(serve(app)) for name, app in apps.items()
        }
        print(json.dumps(addresses), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    report = getattr(module, "report", None)
    print(json.dumps(report() if report else None), flush=True)


if __name__ == "__main__":
    # Run as a script, this folder is first on sys.path: keep it (the module lives here), but
    # after site-packages, so socketio_server.py cannot shadow the python-socketio package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]
    profile_to = os.environ.get("EMITGUARD_BENCH_PROFILE")
    if profile_to:  # where the server's time goes: python -m pstats <file>
        import cProfile

        cProfile.run("asyncio.run(_serve(sys.argv[1], sys.argv[2], sys.argv[3:]))", profile_to)
    else:
        asyncio.run(_serve(sys.argv[1], sys.argv[2], sys.argv[3:]))
