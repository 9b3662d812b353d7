"""An event loop whose clock only moves when nothing else can run: the demo's runs then
happen in an order that depends on the seed alone, so two runs with one seed agree."""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

__all__ = ["VirtualClockLoop", "close_loop", "resync"]


class _Clock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class _SteppingSelector(selectors.BaseSelector):
    """Real I/O through a real selector; a wait for the next timer moves the clock instead."""

    def __init__(self, clock: _Clock, pace: bool) -> None:
        self._clock = clock
        self._pace = pace
        self.origin: float | None = None
        """Real time (``time.monotonic()``) matching virtual time 0; ``None``: set at the next
        select."""
        self._real = selectors.DefaultSelector()

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.origin is None:
            self.origin = time.monotonic() - self._clock.now
        if timeout is None:
            return self._real.select(None)
        ready = self._real.select(0)
        if ready or timeout <= 0:
            return ready
        self._clock.now += timeout
        if self._pace:
            self._keep_pace(self.origin)
        return []

    def _keep_pace(self, origin: float) -> None:
        """Sleep until the real clock reaches the virtual one, like a real loop waiting for
        its next timer; when the loop is behind (busy running callbacks), do not sleep."""
        ahead = origin + self._clock.now - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` only moves when nothing is runnable.

    Timers therefore fire in the order of their due times, each after everything scheduled
    before it has settled, whatever the real speed of the machine. With ``pace=True`` the loop
    also sleeps until the real clock reaches each timer, so real-clock measurements (such as
    ``Emission.waited``) come out as on a real loop.
    """

    def __init__(self, *, pace: bool = True) -> None:
        self._clock = _Clock()
        self._stepper = _SteppingSelector(self._clock, pace)
        super().__init__(self._stepper)

    def time(self) -> float:
        return self._clock.now

    def resync(self) -> None:
        """Forget how far the real clock fell behind; pace from now on."""
        self._stepper.origin = None


def resync() -> None:
    """Start a scenario's pacing afresh when running on a :class:`VirtualClockLoop`."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, VirtualClockLoop):
        loop.resync()


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
