"""python-socketio: guard an ``AsyncServer`` in one call, with connection state recovery.

``guard_server(sio)`` wraps, on that server instance only:

- ``sio.emit`` (and so ``sio.send``, which calls it): an emit to one room (``to=`` or
  ``room=``) is a thread keyed ``(namespace, room)``; it waits on the barrier until someone is
  in the room, buffers while nobody is, and is delivered in order. An emit with no room (a
  broadcast), with ``skip_sid``, a ``callback`` or a list of rooms passes through unchanged.
- the client manager's ``basic_enter_room`` and ``basic_leave_room``, which every room change
  goes through (``enter_room``/``leave_room``, ``disconnect``, and the sid room the framework
  enters itself when a client connects): a room is associated while a member is in it, so a
  room equal to a connected sid is associated while that sid is connected.
- delivery: an emit counts as delivered only when the room has a member whose Engine.IO
  session is live (checked in the manager's rooms and Engine.IO's sessions as the emit goes
  out); an emit into a room whose sockets are gone is kept, not counted as delivered.

With ``recovery=True`` (Socket.IO 4.6's connection state recovery, for python-socketio): every
guarded emit carries its room's ``seq`` as one more argument (``{"emitguard": [room, seq]}``);
a client using :func:`recovering` keeps the last ``seq`` per room, drops duplicates, and on
reconnect sends its previous session id and offsets in the connect ``auth`` payload. After the
app's own connect handler accepted that connection (it sees the offsets and may remove rooms
from them, or refuse), the server puts the client back into the rooms its previous session was
in and replays what it missed from the guard's replay window, then emits
``emitguard:recovery`` ``{"recovered": true, ...}``; a room the window no longer covers, or a
client away longer than ``max_disconnection_duration``, gets an explicit
``emitguard:resync`` instead (never a silent gap).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import wrapt

from emitguard import AdapterError, Guard
from emitguard.calls import MISSING

__all__ = [
    "MARKER",
    "RECOVERY_EVENT",
    "RESYNC_EVENT",
    "SESSION_EVENT",
    "Recovery",
    "SocketEvent",
    "SocketIOGuard",
    "guard_server",
    "recovering",
]

log = logging.getLogger("emitguard.adapters.socketio")

MARKER = "emitguard"
"""Key of the extra last argument ``{"emitguard": [room, seq]}`` of recovered emits, and of
the client's section of the connect ``auth`` payload."""
SESSION_EVENT = "emitguard:session"
"""Sent to a client when it connects: ``{"pid": <private id of this session>}``."""
RECOVERY_EVENT = "emitguard:recovery"
"""Sent after a recovery attempt: ``{"recovered": bool, "rooms": [...], "resync": [...]}``."""
RESYNC_EVENT = "emitguard:resync"
"""Sent for a room whose missed events cannot all be replayed: ``{"room", "after",
"latest", "reason"}``; the client must reload that room's state."""



@dataclasses.dataclass(frozen=True, slots=True)
class SocketEvent:
    """One guarded emit, as the guard keeps it (records show it as ``message``)."""

    event: str
    data: Any
    namespace: str
    room: Hashable
    seq: int = 0
    """The room's sequence number, once stamped (with ``recovery=True``)."""

    @property
    def type(self) -> str:
        """The event name: the record's ``event_type``."""
        return self.event

    def stamped(self, seq: int) -> SocketEvent:
        """This event with its room's seq (``dataclasses.replace`` costs more: hot path)."""
        return SocketEvent(self.event, self.data, self.namespace, self.room, seq)

    def wire(self) -> Any:
        """The ``data`` argument of the original emit (the marker appended once stamped)."""
        if not self.seq:
            return self.data
        if isinstance(self.data, tuple):
            args: tuple[Any, ...] = self.data
        elif self.data is None:
            args = ()
        else:
            args = (self.data,)
        return (*args, {MARKER: [self.room, self.seq]})


class SocketIOGuard:
    """A guarded python-socketio server: ``guard`` is its :class:`emitguard.Guard`;
    :meth:`unguard` restores the server."""

    def __init__(
        self,
        server: Any,
        guard: Guard,
        *,
        recovery: bool,
        max_disconnection_duration: float,
    ) -> None:
        self.server = server
        self.guard = guard
        self.recovery = recovery
        self.confirm = True
        self.max_disconnection_duration = max_disconnection_duration
        self._patches: list[tuple[Any, str]] = []
        self._departed: OrderedDict[tuple[str, str], tuple[float, dict[Any, int]]] = OrderedDict()
        """(namespace, pid) of sessions that went away: when, and the rooms they were in with
        the room's seq when they entered it."""
        self._joined: dict[tuple[str, str], dict[Any, int]] = {}
        """(namespace, sid) -> room -> the room's seq when the sid entered it."""
        self._pids: dict[tuple[str, str], str] = {}
        """(namespace, sid) -> the private id of that session (with recovery)."""
        self._sessions: dict[tuple[str, str], str] = {}
        """(namespace, pid) -> the sid of a session still connected."""

    # ------------------------------------------------------------ patching

    def patch(self) -> None:
        server, manager = self.server, self.server.manager
        self._wrap(server, "emit", self._emit)
        self._wrap(manager, "basic_enter_room", self._entered)
        self._wrap(manager, "basic_leave_room", self._left)
        if self.recovery:
            self._wrap(server, "_handle_connect", self._connected)

    def _wrap(self, holder: Any, name: str, wrapper: Callable[..., Any]) -> None:
        current = getattr(holder, name)
        if isinstance(current, _Guarded):
            raise AdapterError(f"{holder!r}.{name} is already guarded; unguard it first")
        setattr(holder, name, _Guarded(current, wrapper))
        self._patches.append((holder, name))

    def unguard(self) -> None:
        """Put every wrapped method back (the server keeps working, unguarded)."""
        while self._patches:
            holder, name = self._patches.pop()
            if isinstance(vars(holder).get(name), _Guarded):
                delattr(holder, name)

    # ------------------------------------------------------------ emits

    async def _emit(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        event, data, target, skip_sid, namespace, callback, ignore_queue = _emit_call(
            *args, **kwargs
        )
        namespace = namespace or "/"
        kind = event if isinstance(event, str) else None
        message = SocketEvent(event, None if data is MISSING else data, namespace, target)
        if (
            target is None
            or skip_sid is not None
            or callback is not None
            or isinstance(target, (list, tuple, set))
        ):  # not one room: passed through unchanged
            await self.guard.send_call(None, message, wrapped, args, kwargs, _unchanged, kind)
            return
        extra = {"ignore_queue": ignore_queue} if ignore_queue else {}

        live = self._live

        async def deliver(message: SocketEvent) -> bool:
            if not live(namespace, target):
                return False  # nobody there with a live session: kept, not delivered
            await wrapped(message.event, message.wire(), to=target, namespace=namespace, **extra)
            return True

        thread = (namespace, target)
        await self.guard.send_call(thread, message, deliver, (message,), {}, _message_only, kind)

    def _live(self, namespace: str, room: Any) -> bool:
        """Whether the room has a member whose Engine.IO session is live (always, without
        ``confirm``)."""
        if not self.confirm:
            return True
        server = self.server
        sockets = server.eio.sockets
        members = server.manager.rooms.get(namespace, {}).get(room)  # (sid -> eio sid)
        for eio_sid in members.values() if members else ():
            socket = sockets.get(eio_sid)
            if socket is not None and not socket.closed:
                return True
        return False

    # ------------------------------------------------------------ rooms

    def _entered(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = wrapped(*args, **kwargs)
        sid, namespace, room = _room_call(args, kwargs)
        if room is not None:
            try:
                if self.recovery and room != sid:
                    rooms = self._joined.setdefault((namespace, sid), {})
                    rooms.setdefault(room, self.guard.last_seq((namespace, room)))
                self.guard.mark_connected((namespace, room), (namespace, sid))
            except Exception:
                log.exception("emitguard could not record that %s entered %r", sid, room)
        return result

    def _left(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        sid, namespace, room = _room_call(args, kwargs)
        if self.recovery and room == sid:  # the session is going: remember its rooms
            self._remember(namespace, sid)
        elif self.recovery and room is not None and instance.is_connected(sid, namespace):
            self._joined.get((namespace, sid), {}).pop(room, None)  # left it, still here
        result = wrapped(*args, **kwargs)
        if room is not None:
            try:
                self.guard.leave((namespace, room), (namespace, sid), f"{sid} left {room!r}")
            except Exception:
                log.exception("emitguard could not record that %s left %r", sid, room)
        return result

    # ------------------------------------------------------------ recovery

    def _remember(self, namespace: str, sid: str) -> None:
        joined = self._joined.pop((namespace, sid), {})
        pid = self._pids.pop((namespace, sid), None)
        if pid is None:
            return
        self._sessions.pop((namespace, pid), None)
        self._departed[(namespace, pid)] = (time.monotonic(), joined)
        cutoff = time.monotonic() - self.max_disconnection_duration
        while self._departed:
            oldest = next(iter(self._departed.values()))[0]
            if oldest >= cutoff and len(self._departed) <= 100_000:
                break
            self._departed.popitem(last=False)

    async def _connected(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        eio_sid, namespace, auth = [*args, None, None, None][:3]
        result = await wrapped(*args, **kwargs)
        namespace = namespace or "/"
        manager = instance.manager
        sid = manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is None or not manager.is_connected(sid, namespace):
            return result  # refused by the app's connect handler: nothing to recover
        pid = secrets.token_urlsafe(12)
        self._pids[(namespace, sid)] = pid
        self._sessions[(namespace, pid)] = sid
        original = _original(instance.emit)
        await original(SESSION_EVENT, {"pid": pid}, to=sid, namespace=namespace)
        section = auth.get(MARKER) if isinstance(auth, dict) else None
        if isinstance(section, dict):
            await self._recover(original, manager, namespace, sid, section)
        return result

    async def _recover(
        self, emit: Any, manager: Any, namespace: str, sid: str, section: dict[str, Any]
    ) -> None:
        offsets = _offsets(section.get("offsets"))
        previous = (namespace, str(section.get("pid")))
        stale = self._sessions.get(previous)
        if stale is not None and stale != sid:  # back before the server saw it go
            self._remember(namespace, stale)
            await _original(self.server.disconnect)(stale, namespace=namespace)
        departed = self._departed.pop(previous, None)
        fresh = (
            departed is not None
            and time.monotonic() - departed[0] <= self.max_disconnection_duration
        )
        recovered: list[Any] = []
        resync: list[dict[str, Any]] = []
        if fresh and departed is not None:  # rooms the client saw nothing of since it joined
            for room, joined_at in departed[1].items():
                offsets.setdefault(room, joined_at)
        for room, after in offsets.items():
            thread = (namespace, room)
            if not fresh or departed is None or room not in departed[1]:
                why = (
                    "not a room of the previous session"
                    if fresh
                    else "the previous session is unknown or away longer than "
                    f"max_disconnection_duration={self.max_disconnection_duration}s"
                )
                resync.append(await self._resync(emit, sid, namespace, room, after, why))
                continue
            async with self.guard.hold(thread):  # nothing of the room goes out meanwhile
                replay = self.guard.replay(thread, after=after)
                if replay.complete:
                    for _, message in replay.messages:
                        await emit(message.event, message.wire(), to=sid, namespace=namespace)
                    recovered.append(room)
                else:
                    why = "the replay window no longer holds every missed event"
                    resync.append(await self._resync(emit, sid, namespace, room, after, why))
                manager.basic_enter_room(sid, namespace, room)  # back in, still in line
        await emit(
            RECOVERY_EVENT,
            {"recovered": bool(offsets) and not resync, "rooms": recovered, "resync": resync},
            to=sid,
            namespace=namespace,
        )

    async def _resync(
        self, emit: Any, sid: str, namespace: str, room: Any, after: int, why: str
    ) -> dict[str, Any]:
        slot_latest = self.guard.replay((namespace, room), after=after).latest
        notice = {"room": room, "after": after, "latest": slot_latest, "reason": why}
        await emit(RESYNC_EVENT, notice, to=sid, namespace=namespace)
        return notice


if TYPE_CHECKING:
    _FunctionWrapper = wrapt.FunctionWrapper[..., Any]
else:  # wrapt's classes are not subscriptable at run time in every release
    _FunctionWrapper = wrapt.FunctionWrapper


class _Guarded(_FunctionWrapper):
    """The wrapt proxy put in place of a python-socketio method."""


def _original(method: Any) -> Any:
    return method.__wrapped__ if isinstance(method, _Guarded) else method


def _message_only(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (message,), kwargs


def _unchanged(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def _emit_call(
    event: Any,
    data: Any = MISSING,
    to: Any = None,
    room: Any = None,
    skip_sid: Any = None,
    namespace: str | None = None,
    callback: Any = None,
    ignore_queue: bool = False,
    **_: Any,
) -> tuple[Any, Any, Any, Any, str | None, Any, bool]:
    """The arguments of ``AsyncServer.emit`` that the guard reads, bound as python-socketio
    binds them (a call of this, not a dict: the emit path is hot)."""
    return event, data, to if to is not None else room, skip_sid, namespace, callback, ignore_queue


def _room_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str, Any]:
    values = dict(zip(("sid", "namespace", "room"), args, strict=False))
    values.update(kwargs)
    return values.get("sid"), values.get("namespace") or "/", values.get("room")


def _offsets(value: Any) -> dict[Any, int]:
    """``[[room, seq], ...]`` from a client, checked (anything else is ignored)."""
    found: dict[Any, int] = {}
    if not isinstance(value, list):
        return found
    for item in value[:1000]:
        if (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and isinstance(item[0], (str, int))
            and not isinstance(item[0], bool)
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and item[1] >= 0
        ):
            found[item[0]] = item[1]
    return found


def guard_server(
    server: Any,
    *,
    recovery: bool = False,
    max_disconnection_duration: float = 120.0,
    confirm: bool = True,
    **options: Any,
) -> SocketIOGuard:
    """Guard a python-socketio ``AsyncServer`` (see the module docstring); ``options`` go to
    :class:`emitguard.Guard` (``history`` defaults to 1000 per room with ``recovery``).
    ``confirm``: count a delivery only when the room has a member with a live Engine.IO
    session (turn it off with a message-queue client manager, whose members on other
    servers this process cannot see)."""
    if not hasattr(server, "manager") or not hasattr(server, "eio"):
        raise AdapterError(f"guard_server() takes a python-socketio AsyncServer, got {server!r}")
    if not isinstance(max_disconnection_duration, (int, float)) or max_disconnection_duration <= 0:
        raise ValueError(
            f"max_disconnection_duration must be > 0 seconds, got {max_disconnection_duration!r}"
        )
    if recovery:
        options.setdefault("history", 1000)
        if not options["history"]:
            raise ValueError("recovery=True needs a replay window: history must be >= 1")
        options.setdefault("stamp_seq", _stamp)
    options.setdefault("name", f"socketio-{id(server):x}")
    guard = Guard(**options)
    adapter = SocketIOGuard(
        server, guard, recovery=recovery, max_disconnection_duration=max_disconnection_duration
    )
    adapter.confirm = confirm
    adapter.patch()
    return adapter


def _stamp(message: Any, seq: int) -> Any:
    return message.stamped(seq) if isinstance(message, SocketEvent) else message


# ---------------------------------------------------------------- the client side


class Recovery:
    """A python-socketio ``AsyncClient``'s side of connection state recovery (see
    :func:`recovering`): the last ``seq`` per room, duplicates dropped, and what to send in
    the connect ``auth`` payload."""

    def __init__(self, client: Any, auth: Any = None) -> None:
        self.client = client
        self.offsets: dict[tuple[str, Any], int] = {}
        """(namespace, room) -> the last seq received."""
        self.pids: dict[str, str] = {}
        """namespace -> the private id of the current (or last) session."""
        self.recovered = False
        """Whether the last connection recovered every room it asked for."""
        self.resyncs: list[dict[str, Any]] = []
        """Resync notices received (rooms whose state the app must reload)."""
        self.duplicates = 0
        self._auth = auth

    async def auth(self, namespace: str = "/") -> dict[str, Any]:
        """The ``auth`` payload: the app's own (``auth=`` given to :func:`recovering`) plus
        the previous session and offsets."""
        base = self._auth
        if callable(base):
            base = base()
            if hasattr(base, "__await__"):
                base = await base
        payload = dict(base or {})
        offsets = [[room, seq] for (ns, room), seq in self.offsets.items() if ns == namespace]
        if namespace in self.pids:
            payload[MARKER] = {"pid": self.pids[namespace], "offsets": offsets}
        return payload

    async def trigger(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if len(args) < 2:  # ("connect", namespace=...): nothing of ours
            return await wrapped(*args, **kwargs)
        event, namespace, *rest = args
        if event == SESSION_EVENT and rest and isinstance(rest[0], dict):
            self.pids[namespace] = str(rest[0].get("pid"))
            self.recovered = False
            return None
        if event == RECOVERY_EVENT and rest and isinstance(rest[0], dict):
            self.recovered = bool(rest[0].get("recovered"))
        elif event == RESYNC_EVENT and rest and isinstance(rest[0], dict):
            notice = rest[0]
            self.resyncs.append(notice)
            key = (namespace, notice.get("room"))
            if isinstance(notice.get("latest"), int):
                self.offsets[key] = notice["latest"]  # live events after it are new
        elif rest and isinstance(rest[-1], dict) and set(rest[-1]) == {MARKER}:
            room, seq = rest[-1][MARKER]
            key = (namespace, room)
            if seq <= self.offsets.get(key, 0):
                self.duplicates += 1
                return None  # seen before: a replay overlapping what arrived
            self.offsets[key] = seq
            args = (event, namespace, *rest[:-1])
        return await wrapped(*args, **kwargs)


def recovering(client: Any, auth: Any = None) -> Recovery:
    """Give a python-socketio ``AsyncClient`` connection state recovery: pass
    ``auth=recovery.auth`` to ``client.connect()`` (the app's own auth goes to this call)."""
    recovery = Recovery(client, auth)
    client._trigger_event = _Guarded(client._trigger_event, recovery.trigger)
    return recovery
