"""For adapters that see the wire: delivery confirmation and the connection being served.

The engine knows no framework. A transport adapter (the Starlette middleware, for one) tells it
two things through context variables:

- :func:`frame_sent`, for every data frame that really left through the transport. While a
  guard confirms deliveries (:meth:`emitguard.Guard.confirm_deliveries`), it opens a
  :class:`Probe` around each call of the original send; a send that reports success while no
  frame left is not taken as delivered. Tasks the manager spawns inherit the probe.
- :func:`dropped`, when the stack dropped the message of the send running in this context
  (a queue over capacity) and said nothing to the caller: the send is not taken as delivered,
  and the reason given is recorded.
- :func:`handling`, around the handling of one message by a connection (a consumer's
  handler): a confirmation waiting on that connection waits on while it is busy.
- :func:`tag`, for a transport that can carry a mark with the message to where it is handled
  (a channel layer's message dict): the send's probe is then confirmed only by the frames
  sent while the message with that mark is handled (``frame_sent(owner, tag)``), not by any
  frame of its connections, so the guard can confirm several sends of a thread at once
  instead of one after the other.
- :func:`serving`, around the code that serves one connection: an association made there is
  owned by that connection, so the thread is disconnected when the connection goes (unless
  another live connection carries it).

And one thing from any adapter that wraps an association call: :func:`association`, around
that call. A send to the same thread made inside it (the manager greeting the connection it
associates) is delivered at once instead of waiting on the barrier the call is about to open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from typing import Any

from emitguard._loops import resolve

__all__ = [
    "Probe",
    "associating",
    "association",
    "busy",
    "dropped",
    "frame_sent",
    "handling",
    "serving",
    "serving_owner",
    "tag",
]


class Probe:
    """Counts the frames that leave while one original send runs (and after, for frames sent
    by tasks it spawned)."""

    __slots__ = ("_waiter", "dropped", "frames", "landed", "more", "opened", "owner", "tag")

    def __init__(self) -> None:
        self.frames = 0
        self.dropped: str | None = None
        """Why the stack dropped the message (:func:`dropped`), or ``None``."""
        self.opened = time.monotonic()
        """When the send started: a frame on a carrier since then counts (:meth:`wait`)."""
        self.owner: object = None
        """The first connection a frame left through, when the transport named it."""
        self.more: set[object] | None = None
        """Any further connections (rare: made when needed)."""
        self.tag: str | None = None
        """Set by :func:`tag`: only the frames of the handling of the tagged message count."""
        self.landed: Callable[[Probe], None] | None = None
        """Called with the probe on each frame (a send confirmed behind: the guard's)."""
        self._waiter: asyncio.Future[None] | None = None

    @property
    def owners(self) -> set[object]:
        """The connections the frames left through, when the transport named them."""
        found = set() if self.owner is None else {self.owner}
        return found if self.more is None else found | self.more

    def outside(self, known: set[Any]) -> set[object]:
        """The connections frames left through that are not in ``known``."""
        first = self.owner
        if first is None or (self.more is None and first in known):
            return set()
        return self.owners - known

    def sent(self, owner: object = None) -> None:
        self.frames += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # on its own loop: the frame may have
            resolve(waiter)  # left from another loop's thread (an async_to_sync sender)
        if owner is not None and owner is not self.owner:
            self._remember(owner)
        if self.landed is not None:
            self.landed(self)

    def _remember(self, owner: object) -> None:
        try:
            if self.owner is None:
                hash(owner)
                self.owner = owner
            elif owner != self.owner:
                if self.more is None:
                    self.more = set()
                self.more.add(owner)
        except TypeError:  # an unhashable connection: counted, not remembered
            return

    async def wait(self, timeout: float, carriers: Iterable[object] = ()) -> bool:
        """Wait up to ``timeout`` seconds for a first frame; True when one left.

        Besides frames sent in the send's context (and tasks it spawned), a frame that leaves
        meanwhile on one of ``carriers`` (the connections known to carry the thread) counts:
        a manager whose per-socket writer task was started outside the send is seen too.
        """
        if self.frames or timeout <= 0:
            return self.frames > 0
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        carriers = list(carriers)  # the guard's owner keys: hashable
        watched = carriers if self.tag is None else []  # (a tagged send's frames name it)
        for carrier in watched:
            _watchers.setdefault(carrier, set()).add(self)
        # Watched from here on; a frame that left on a carrier before (a consumer on another
        # OS thread's loop may send it the moment the original returns) is in _recent.
        opened = self.opened
        if any(_recent.get(carrier, -1.0) >= opened for carrier in watched):
            self.frames += 1
        try:
            started = time.monotonic()
            while not self.frames:
                # (a timer that resolves the waiter, not asyncio.wait_for: half the cost on
                # this per-send path, and no lost cancellation on Python 3.11)
                timer = loop.call_later(timeout, _time_up, self._waiter)
                try:
                    await self._waiter
                finally:
                    timer.cancel()
                if self.frames or not busy(carriers, started):  # (a carrier still handling
                    break  # a message is alive: wait on for its frame)
                self._waiter = loop.create_future()
        finally:
            for carrier in watched:
                probes = _watchers.get(carrier)
                if probes is not None:
                    probes.discard(self)
                    if not probes:
                        del _watchers[carrier]
        return self.frames > 0

    def done(self) -> None:
        """The send's outcome is decided: a frame of its tagged message counts no more."""
        if self.tag is not None:
            _tagged.pop(self.tag, None)


def _time_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


PROBE: ContextVar[Probe | None] = ContextVar("emitguard_probe", default=None)
"""The probe open in this context (the engine's fast path sets it without open_probe)."""
_watchers: dict[object, set[Probe]] = {}
"""Probes waiting for a frame on a connection (only while a confirmation is late)."""
_recent: dict[object, float] = {}
"""When each connection last sent a frame outside any send's context (forgotten when its
owner goes; emptied past ``_RECENT_LIMIT`` entries, the worst case being a confirmation
missed and the event sent again)."""
_RECENT_LIMIT = 100_000
_handling: dict[object, int] = {}
"""Connections handling a message now (:func:`handling`), with how many at once."""
_tagged: dict[str, Probe] = {}
"""Tagged probes whose outcome is not decided yet, by tag."""
_tags = itertools.count(1)
_TAG_PREFIX = secrets.token_hex(6) + "."
"""This process's: a tag travels through a shared channel layer, and a consumer in another
process must not take it for one of its own."""
BUSY_LIMIT = 30.0
"""Seconds a confirmation waits on for a frame while a carrier is still handling a message
(:func:`handling`); a connection busy longer counts as stuck."""
_serving: ContextVar[object] = ContextVar("emitguard_serving", default=None)
_associating: ContextVar[frozenset[object]] = ContextVar(
    "emitguard_associating", default=frozenset()
)


def frame_sent(owner: object = None, tag: object = None) -> None:
    """A data frame left through the transport (of connection ``owner``, if known, and
    hashable); ``tag``: the :func:`tag` of the message being handled when it left."""
    if tag is not None:  # the frame of a tagged message: it confirms that send (a tag of
        tagged = _tagged.get(tag) if isinstance(tag, str) else None  # another process: no)
        if tagged is not None:
            tagged.sent(owner)
            return
    probe = PROBE.get()
    if probe is not None:  # (Probe.sent, inlined: once per frame while confirming)
        probe.frames += 1
        waiter = probe._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if owner is not None and owner is not probe.owner:
            probe._remember(owner)
    elif owner is not None:
        try:
            _recent[owner] = time.monotonic()
        except TypeError:  # an unhashable connection carries no known thread
            return
        if len(_recent) > _RECENT_LIMIT:
            _recent.clear()
        if _watchers:
            for late in list(_watchers.get(owner, ())):
                late.sent(owner)


def dropped(reason: str) -> None:
    """The stack dropped the message of the send running in this context (or in a task it
    spawned), e.g. a channel over capacity, while the send returns as if it worked. While the
    guard confirms deliveries the send is then not delivered: it is retried and kept, with
    ``reason`` on its record. Outside a guarded send (no probe open) this does nothing."""
    probe = PROBE.get()
    if probe is not None and probe.dropped is None:
        probe.dropped = reason


def tag() -> str | None:
    """A mark for the message of the send running in this context, or ``None`` (no guard
    confirms it). The transport carries it with the message to where it is handled, and
    reports each frame sent while handling that message with ``frame_sent(owner, tag)``:
    the send is confirmed by those frames, and by no other frame of its connections."""
    probe = PROBE.get()
    if probe is None:
        return None
    if probe.tag is None:
        if len(_tagged) > _RECENT_LIMIT:  # (probes never decided: at worst a send is retried)
            _tagged.clear()
        probe.tag = f"{_TAG_PREFIX}{next(_tags)}"
        _tagged[probe.tag] = probe
    return probe.tag


def busy(carriers: Iterable[object], since: float) -> bool:
    """Whether one of ``carriers`` is handling a message (:class:`handling`), and ``since``
    (``time.monotonic()``) is less than :data:`BUSY_LIMIT` seconds ago: a confirmation that
    waits on it since then waits on."""
    return (
        bool(_handling)
        and any(carrier in _handling for carrier in carriers)
        and time.monotonic() - since < BUSY_LIMIT
    )


def forget(owner: object) -> None:
    """``owner`` (a connection) went away: forget when it last sent a frame."""
    try:
        _recent.pop(owner, None)
    except TypeError:
        return


def open_probe() -> tuple[Probe, Token[Probe | None]]:
    """Start counting frames in the current context (the engine calls this)."""
    probe = Probe()
    return probe, PROBE.set(probe)


def close_probe(token: Token[Probe | None]) -> None:
    """Stop counting (a send's coroutine closed from elsewhere, e.g. when its event loop is
    torn down, runs this in another context: there is nothing to restore then)."""
    try:
        PROBE.reset(token)
    except ValueError:
        return


class handling:  # (a context manager used like a function: a class is cheaper)
    """Connection ``owner`` (hashable) is handling a message inside (a consumer's handler
    runs): it is alive, so a confirmation waiting for a frame on it waits past its timeout,
    for as long as the handling lasts (up to :data:`BUSY_LIMIT` seconds)."""

    __slots__ = ("owner",)

    def __init__(self, owner: object) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        owner = self.owner
        _handling[owner] = _handling.get(owner, 0) + 1

    def __exit__(self, *exc: object) -> None:
        owner = self.owner
        left = _handling.get(owner, 1) - 1
        if left > 0:
            _handling[owner] = left
        else:
            _handling.pop(owner, None)


@contextlib.contextmanager
def serving(owner: object) -> Iterator[None]:
    """Associations made inside are owned by ``owner`` (a connection)."""
    token = _serving.set(owner)
    try:
        yield
    finally:
        _serving.reset(token)


def serving_owner() -> object:
    """The connection being served here, or ``None``."""
    return _serving.get()


@contextlib.contextmanager
def association(thread_id: object) -> Iterator[None]:
    """The association call of ``thread_id`` runs inside (tasks it spawns inherit it)."""
    try:
        threads = _associating.get() | {thread_id}
    except TypeError:  # an unhashable id: no send can name it usefully either
        yield
        return
    token = _associating.set(threads)
    try:
        yield
    finally:
        _associating.reset(token)


def associating(thread_id: object) -> bool:
    """Whether the association call of ``thread_id`` is running in this context."""
    threads = _associating.get()
    return bool(threads) and thread_id in threads
