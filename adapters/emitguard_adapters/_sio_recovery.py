"""Socket.IO 4.6's connection state recovery, server side, for a guarded python-socketio server.

The protocol is the one the official ``socket.io-client`` (v4.6+) speaks:

- the server's CONNECT answer carries ``{"sid", "pid"}``: ``pid`` is the session's private id;
- every recoverable event carries an *offset* string as its last argument; the client keeps
  the last one it received;
- a reconnecting client puts ``pid`` and ``offset`` in its CONNECT packet's auth; when the
  server answers with the same ``pid`` (and the same ``sid``) the client sets
  ``socket.recovered``; the missed events come before that answer, in order; otherwise the
  session is a fresh one (new ``sid`` and ``pid``) and nothing is replayed.

Offsets here are positions in the server's write order: each recoverable event is numbered
when it is handed to python-socketio (``<epoch>.<n>``), and a socket receives its events in
that order. A client that last saw ``n`` missed, in each room its session was in, exactly the
delivered events numbered above ``n`` (and above the moment the session entered the room); the
guard's replay window holds them, or the window no longer covers the gap and the session is
not recovered (never a partial replay).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from emitguard_adapters._sio_patch import original as _original

if TYPE_CHECKING:
    from emitguard_adapters.socketio import SocketEvent, SocketIOGuard

log = logging.getLogger("emitguard.adapters.socketio")

MAX_DEPARTED = 100_000
"""Sessions kept for recovery at most (the oldest go first), whatever their age."""


@dataclasses.dataclass(slots=True)
class Session:
    """A Socket.IO session (one namespace of one client) that recovery may restore."""

    pid: str
    sid: str
    rooms: dict[Any, int]
    """Room -> the write count when the session entered it (its sid room included)."""
    left_at: float = 0.0
    recoverable: bool = True
    """False once the client or the server closed it on purpose (as Socket.IO: only a lost
    transport, a ping timeout or a transport error leave a session to recover)."""


class Sessions:
    """Pids, offsets and departed sessions of one guarded server."""

    def __init__(self, adapter: SocketIOGuard, max_disconnection_duration: float) -> None:
        self.adapter = adapter
        self.max_disconnection_duration = max_disconnection_duration
        self.epoch = secrets.token_hex(3)
        """Prefix of this server's offsets: an offset from another server (or an app's own
        string argument) is never taken for a position."""
        self.written = 0
        """Recoverable events handed to python-socketio so far (the last offset's number)."""
        self.live: dict[tuple[str, str], Session] = {}
        """(namespace, sid) -> the session while connected."""
        self.sids: dict[tuple[str, str], str] = {}
        """(namespace, pid) -> the sid of a session while connected."""
        self.departed: OrderedDict[tuple[str, str], Session] = OrderedDict()
        """(namespace, pid) -> a session whose transport went, oldest first."""
        self.restoring: dict[tuple[str, str], Any] = {}
        """(eio_sid, namespace) -> the auth of a CONNECT being handled."""
        self.recovered: set[tuple[str, str]] = set()
        """(namespace, sid) of sessions restored by their current connection."""
        self.deferred: dict[tuple[str, str], tuple[Session, int]] = {}
        """(namespace, sid) -> a recovery the app's connect handler has yet to accept
        (``skip_connect_handler`` off): nothing restored or sent to it before."""

    # ------------------------------------------------------------ offsets

    def number(self, message: SocketEvent) -> Any:
        """Give a recoverable event its offset (once: a retried write keeps it); returns
        what to write (:meth:`SocketEvent.wire`)."""
        if not message.offset:
            self.written = number = self.written + 1
            message.written = number
            message.offset = f"{self.epoch}.{number}"
        return message.wire()

    def next_offset(self) -> str:
        """An offset for an event that is not kept for replay (a broadcast)."""
        self.written += 1
        return f"{self.epoch}.{self.written}"

    def position(self, offset: Any) -> int | None:
        """The write count an offset of this server stands for (``None``: not one)."""
        if not isinstance(offset, str):
            return None
        epoch, _, number = offset.partition(".")
        if epoch != self.epoch or not number.isdigit():
            return None
        found = int(number)
        return found if found <= self.written else None

    # ------------------------------------------------------------ sessions

    def opened(self, namespace: str, sid: str, pid: str | None = None) -> Session:
        session = Session(pid or secrets.token_urlsafe(12), sid, {sid: self.written})
        self.live[(namespace, sid)] = session
        self.sids[(namespace, session.pid)] = sid
        return session

    def entered(self, namespace: str, sid: str, room: Any) -> None:
        session = self.live.get((namespace, sid))
        if session is not None:
            session.rooms.setdefault(room, self.written)

    def left(self, namespace: str, sid: str, room: Any, still_connected: bool) -> None:
        if room == sid:  # the session is going: keep it for its client's return
            self.went(namespace, sid)
        elif still_connected:
            session = self.live.get((namespace, sid))
            if session is not None:
                session.rooms.pop(room, None)

    def closing(self, namespace: str, sid: str) -> None:
        """The client or the server disconnects on purpose: nothing to recover."""
        session = self.live.get((namespace, sid))
        if session is not None:
            session.recoverable = False

    def went(self, namespace: str, sid: str) -> None:
        session = forget(self, namespace, sid)
        if session is None or not session.recoverable:
            return
        now = session.left_at = time.monotonic()
        self.departed[(namespace, session.pid)] = session
        cutoff = now - self.max_disconnection_duration
        while self.departed:
            oldest = next(iter(self.departed.values()))
            if oldest.left_at >= cutoff and len(self.departed) <= MAX_DEPARTED:
                break
            self.departed.popitem(last=False)

    # ------------------------------------------------------------ restoring

    async def claim(self, namespace: str, auth: Any) -> tuple[Session, int] | None:
        """The departed session a CONNECT's auth names, and the client's position, if it
        may be recovered (a stale connection of it still open is closed first)."""
        if not isinstance(auth, dict):
            return None
        pid, position = auth.get("pid"), self.position(auth.get("offset"))
        if not isinstance(pid, str) or position is None:
            return None
        await close_stale(self, namespace, pid)
        session = self.departed.pop((namespace, pid), None)
        if session is None:
            return None
        if time.monotonic() - session.left_at > self.max_disconnection_duration:
            return None
        return session, position

    def missed(self, namespace: str, session: Session, position: int) -> list[SocketEvent] | None:
        """Every event of the session's rooms written after ``position`` (and after the
        session entered the room), in write order; ``None`` when the replay window no
        longer covers one of the rooms."""
        guard = self.adapter.guard
        found: list[SocketEvent] = []
        for room, entered in session.rooms.items():
            after = max(position, entered)
            replay = guard.replay((namespace, room), after=0)
            kept = [message for _, message in replay.messages]
            if not replay.complete and (not kept or kept[0].written > after):
                return None  # what fell out of the window may have been missed
            found.extend(message for message in kept if message.written > after)
        found.sort(key=_written)
        return found

    async def restore(
        self, manager: Any, eio_sid: str, namespace: str, claim: Any, *, authorised: bool
    ) -> Any:
        """Connect ``eio_sid`` as the claimed session (same sid, same rooms) and write what
        its client missed; ``None`` when it cannot be recovered after all.

        Not ``authorised`` (the app's connect handler is to run first): only the session's
        sid is connected; its rooms and what it missed wait for :meth:`complete`, so a
        client the handler refuses is sent nothing."""
        session, position = claim
        if manager.is_connected(session.sid, namespace) or session.sid in manager.rooms.get(
            namespace, {}
        ).get(None, {}):
            return None  # its sid is taken again
        sid = session.sid
        if not authorised:
            if self.missed(namespace, session, position) is None:
                return None
            try:
                _pre_connect(manager, eio_sid, namespace, sid, rooms=False)
            except Exception:  # this Engine.IO session is in the namespace already (bidict)
                return None
            self.opened(namespace, sid, session.pid)
            self.recovered.add((namespace, sid))
            self.deferred[(namespace, sid)] = claim
            return sid
        async with self._held(namespace, session):
            missed = self.missed(namespace, session, position)
            if missed is None:
                return None
            try:
                _pre_connect(manager, eio_sid, namespace, sid)  # sid room entered: associated
            except Exception:  # this Engine.IO session is in the namespace already (bidict)
                return None
            self.opened(namespace, sid, session.pid)
            self.recovered.add((namespace, sid))
            await self._rejoin(manager, namespace, session, missed)
        return sid

    async def complete(self, manager: Any, namespace: str, sid: str) -> bool:
        """The app's connect handler accepted a deferred recovery: restore the session's
        rooms and write what it missed. False (nothing written) when the replay window
        moved past it meanwhile."""
        session, position = self.deferred.pop((namespace, sid))
        async with self._held(namespace, session):
            missed = self.missed(namespace, session, position)
            if missed is None:
                return False
            manager.basic_enter_room(sid, namespace, sid)  # sid room entered: associated
            await self._rejoin(manager, namespace, session, missed)
        return True

    def refused(self, namespace: str, sid: str) -> None:
        """The app's connect handler refused a deferred recovery: the session is over."""
        self.deferred.pop((namespace, sid), None)
        forget(self, namespace, sid)

    @contextlib.asynccontextmanager
    async def _held(self, namespace: str, session: Session) -> AsyncIterator[None]:
        """Hold the lines of every room of the session (one order: no two holds cross)."""
        guard = self.adapter.guard
        async with contextlib.AsyncExitStack() as held:
            for room in sorted(session.rooms, key=repr):
                await held.enter_async_context(guard.hold((namespace, room)))
            yield

    async def _rejoin(
        self, manager: Any, namespace: str, session: Session, missed: list[SocketEvent]
    ) -> None:
        """Enter the session's other rooms again and write what it missed, in order."""
        sid = session.sid
        for room in session.rooms:
            if room != sid:
                manager.basic_enter_room(sid, namespace, room)
        emit = _original(self.adapter.server.emit)
        for message in missed:
            await emit(message.event, message.wire(), to=sid, namespace=namespace)
        log.debug("session %s recovered: %d events replayed", sid, len(missed))


async def close_stale(sessions: Any, namespace: str, pid: str) -> None:
    """The client of ``pid`` is back before the server saw its connection go: close that
    connection (its session is then kept for the recovery)."""
    sid = sessions.sids.get((namespace, pid))
    stale = sessions.live.get((namespace, sid)) if sid is not None else None
    if stale is not None and stale.recoverable:
        server = sessions.adapter.server
        await _original(server.disconnect)(stale.sid, namespace=namespace, ignore_queue=True)
        sessions.went(namespace, stale.sid)


def forget(sessions: Any, namespace: str, sid: str) -> Any:
    """Drop a session from ``sessions.live`` (and its pid, its recovered mark): the
    session, or ``None`` when it was not live."""
    sessions.recovered.discard((namespace, sid))
    session = sessions.live.pop((namespace, sid), None)
    if session is not None:
        sessions.sids.pop((namespace, session.pid), None)
    return session


def _written(message: SocketEvent) -> int:
    return message.written


def _pre_connect(
    manager: Any, eio_sid: str, namespace: str, sid: str, *, rooms: bool = True
) -> None:
    """python-socketio's ``BaseManager.pre_connect`` with a given sid (the recovered one);
    without ``rooms``, not its sid room either (entered once the recovery is accepted)."""
    manager.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
    if rooms:
        manager.basic_enter_room(sid, namespace, sid, eio_sid=eio_sid)
    manager.pending_connect.setdefault(namespace, []).append(sid)
