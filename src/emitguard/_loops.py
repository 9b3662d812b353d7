"""Event loops and OS threads: wake a future on its own loop, run a timer wherever we are.

A guard may be used from several event loops and OS threads at once. Every future belongs to
the loop that made it, and only that loop may resolve it; these helpers hand the work over
with ``call_soon_threadsafe`` whenever the caller is not on that loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Signal", "alive", "call_on", "later", "resolve", "running_loop"]


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this OS thread, or ``None``."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def alive(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether ``loop`` is running (so work handed to it will run)."""
    return loop is not None and loop.is_running() and not loop.is_closed()


def call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Run ``fn(*args)`` on ``loop``: now when we are on it, else handed over. False when the
    loop is closed (nothing will run)."""
    if running_loop() is loop:
        fn(*args)
        return True
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # closed
        return False
    return True


def _set(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def resolve(future: asyncio.Future[Any], value: Any = None) -> bool:
    """Resolve ``future`` with ``value`` on its own loop; False when its loop is closed."""
    if future.done():
        return True
    return call_on(future.get_loop(), _set, future, value)


class Later:
    """A cancellable timer from :func:`later`."""

    __slots__ = ("_cancelled", "_handle")

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | threading.Timer | None = None
        self._cancelled = False

    def _start(self, loop: asyncio.AbstractEventLoop, delay: float, fn: Callable[[], Any]) -> None:
        if not self._cancelled:
            self._handle = loop.call_later(delay, fn)

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None:
            self._handle.cancel()


def later(
    delay: float, fn: Callable[[], Any], home: asyncio.AbstractEventLoop | None = None
) -> Later:
    """Call ``fn()`` after ``delay`` seconds: on the loop running here; else on ``home`` (a
    loop the guard works on, even while it is paused between runs), on its own clock; else,
    with no loop at all (synchronous code), from a timer thread."""
    timer = Later()
    loop = running_loop()
    if loop is not None:
        timer._start(loop, delay, fn)
    elif home is not None and not home.is_closed():
        home.call_soon_threadsafe(timer._start, home, delay, fn)
    else:
        thread = threading.Timer(delay, fn)
        thread.daemon = True
        thread.start()
        timer._handle = thread
    return timer


class Signal:
    """Wakes every waiter, on whichever loop each one waits (a cross-loop ``Event`` pulse)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def fire(self) -> None:
        """Wake everyone waiting now."""
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            resolve(future)

    async def wait(self, timeout: float | None) -> None:
        """Wait for the next :meth:`fire`, at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append(future)
        timer = loop.call_later(timeout, _set, future, None) if timeout is not None else None
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            if future in self._waiters:
                self._waiters.remove(future)
