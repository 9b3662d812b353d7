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

The synchronous ``socketio.Server`` (threading, eventlet or gevent) is guarded the same way,
without the barrier (a synchronous send never waits: an emit to an empty room is buffered at
once and flushed, in order, when someone enters the room) and without recovery.

With ``recovery=True``, Socket.IO 4.6's connection state recovery, in its own protocol: the
stock ``socket.io-client`` (v4.6+) recovers with no client code. The CONNECT answer carries a
``pid``; every recoverable emit carries an offset string as its last argument; a client that
comes back with ``pid`` and its last offset in its CONNECT auth gets the same sid, its rooms,
and every event it missed, in order, before the answer with the same ``pid``
(``socket.recovered``); or, when the replay window or ``max_disconnection_duration`` does
not cover the gap, a fresh session and no replay at all. See ``_sio_recovery``;
:func:`recovering` is the same client side for python-socketio's ``AsyncClient``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from emitguard import AdapterError, Guard
from emitguard.backends import from_url
from emitguard.calls import MISSING
from emitguard_adapters._sio_client import Recovery, recovering
from emitguard_adapters._sio_patch import Guarded as _Guarded
from emitguard_adapters._sio_recovery import Sessions
from emitguard_adapters._sio_shared import SharedSessions, room_thread

__all__ = [
    "Recovery",
    "SocketEvent",
    "SocketIOGuard",
    "guard_server",
    "recovering",
]

log = logging.getLogger("emitguard.adapters.socketio")

@dataclasses.dataclass(slots=True)
class SocketEvent:
    """One guarded emit, as the guard keeps it (records show it as ``message``)."""

    event: str
    data: Any
    namespace: str
    room: Hashable
    written: int = 0
    """Its place in the server's write order, once handed to python-socketio with recovery
    (0: not yet, or no recovery)."""
    offset: str = ""
    """The offset appended as its last argument (with recovery)."""
    ignore_queue: bool = False
    """Emitted with ``ignore_queue=True`` (past a message-queue client manager)."""
    passing: bool = False
    """Names no one room (a broadcast, ``skip_sid``, a callback, a list of rooms): passed
    through unchanged."""
    acked: bool = False
    """Emitted with a ``callback`` (an ack: never given an offset)."""

    @property
    def type(self) -> str:
        """The event name: the record's ``event_type``."""
        return self.event

    def wire(self) -> Any:
        """The ``data`` argument of the original emit (the offset appended, if it has one)."""
        if not self.offset:
            return self.data
        return (*_arguments(self.data), self.offset)


def _arguments(data: Any) -> tuple[Any, ...]:
    """An emit's ``data`` as python-socketio expands it into arguments."""
    if isinstance(data, tuple):
        return data
    return () if data is None else (data,)


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
        skip_connect_handler: bool = True,
        shared: bool = False,
    ) -> None:
        self.server = server
        self.guard = guard
        self.recovery = recovery
        self.confirm = True
        self.skip_connect_handler = skip_connect_handler
        self.shared = shared
        """On the Redis outbox: rooms and recovery across workers (see ``_sio_shared``)."""
        self.sessions: Any = (
            SharedSessions(self, max_disconnection_duration)
            if shared and recovery
            else Sessions(self, max_disconnection_duration)
        )
        """Recovery's state: pids, offsets, sessions kept for their client's return."""
        self._patches: list[tuple[Any, str]] = []
        self._carriers: dict[tuple[str, Any], Any] = {}
        """(namespace, room) -> the Engine.IO socket of a member found live, until anyone
        leaves the room (every leave, a disconnect's and a closed room's too, goes through
        the manager's ``basic_leave_room``) or the socket closes: :meth:`_live`."""
        self._send_call = guard.send_call
        self.asynchronous = inspect.iscoroutinefunction(server.emit)
        """An ``AsyncServer`` (``False``: the synchronous ``socketio.Server``)."""
        self._original_emit: Callable[..., Awaitable[Any]] = server.emit
        """The server's ``emit`` as it was before :meth:`patch` (what a guarded emit calls)."""

    def recovered(self, sid: str, namespace: str = "/") -> bool:
        """Whether the session ``sid`` was restored by its current connection (Socket.IO's
        ``socket.recovered``): a connect handler that is not skipped can tell."""
        return (namespace, sid) in self.sessions.recovered

    # ------------------------------------------------------------ patching

    def patch(self) -> None:
        server, manager = self.server, self.server.manager
        self._original_emit = server.emit
        emit = self._emit_shared if self.shared else self._emit
        self._wrap(server, "emit", emit if self.asynchronous else self._emit_sync)
        self._wrap(manager, "basic_enter_room", self._entered)
        self._wrap(manager, "basic_leave_room", self._left)
        if self.recovery:
            self._wrap(server, "_handle_connect", self._connecting)
            self._wrap(manager, "pre_connect", self._pre_connect)
            self._wrap(server, "_send_packet", self._send_packet)
            self._wrap(server, "_trigger_event", self._trigger_event)
            self._wrap(server, "_handle_disconnect", self._client_disconnect)
            self._wrap(server, "disconnect", self._server_disconnect)

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
        if isinstance(self.sessions, SharedSessions):
            self.sessions.close()

    # ------------------------------------------------------------ emits

    async def _emit(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        message = _event(*args, **kwargs)
        if message.passing:
            args, kwargs = self._passed(message, args, kwargs)
            kind = message.event if isinstance(message.event, str) else None
            await self._send_call(None, message, wrapped, args, kwargs, _unchanged, kind)
        else:  # (one bound method for every emit, not a closure per emit; the event type is
            # read from the message, SocketEvent.type, when a record needs it: this path is hot)
            thread = (message.namespace, message.room)
            await self._send_call(thread, message, self._deliver, (message,), {}, _one)

    def _emit_sync(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """:meth:`_emit` for the synchronous ``socketio.Server``."""
        message = _event(*args, **kwargs)
        kind = message.event if isinstance(message.event, str) else None
        send = self.guard.send_sync_call
        if message.passing:
            args, kwargs = self._passed(message, args, kwargs)
            send(None, message, wrapped, args, kwargs, _unchanged, kind)
        else:
            thread = (message.namespace, message.room)
            send(thread, message, self._deliver_sync, (message,), {}, _one, kind)

    async def _emit_shared(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """:meth:`_emit` on the Redis outbox: an emit to one str room goes to the room's log
        as a JSON dict; any other emit passes through (to this worker's clients only)."""
        message = _event(*args, **kwargs)
        kind = message.event if isinstance(message.event, str) else None
        stored = None if message.passing else _stored(message)
        if stored is None:
            await self._send_call(None, message, wrapped, args, kwargs, _unchanged, kind)
            return
        thread = room_thread(message.namespace, message.room)  # type: ignore[arg-type]
        deliver = self._deliver_shared
        await self._send_call(thread, stored, deliver, (thread, stored), {}, _two, kind)

    async def _deliver_shared(self, thread_id: str, message: dict[str, Any]) -> bool:
        """Hand an entry of a room's log to this worker's members of the room (the relay's
        ``deliver``): with recovery one by one, each with its offset."""
        if self.recovery:
            return await self.sessions.deliver(thread_id, message)  # type: ignore[no-any-return]
        namespace, room = message["namespace"], message["room"]
        if self.confirm and not self._live(namespace, room):
            return False
        await self._original_emit(
            message["event"], tuple(message["args"]), to=room, namespace=namespace
        )
        return True

    def _passed(
        self, message: SocketEvent, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments of an emit passed through: unchanged, or with an offset appended
        under recovery (none with a callback: an ack is not recoverable)."""
        if self.recovery and not message.acked:
            return _with_offset(args, kwargs, self.sessions.next_offset())
        return args, kwargs

    async def _deliver(self, message: SocketEvent) -> bool:
        """Hand one guarded emit to python-socketio (``False``: nobody in its room has a live
        session, so it is kept, not delivered)."""
        namespace, room = message.namespace, message.room
        if self.confirm and not self._live(namespace, room):
            return False
        if self.recovery:
            data = self.sessions.number(message)  # (no await before the write: offsets
            # follow the write order)
        else:
            data = message.data
        if message.ignore_queue:
            await self._original_emit(
                message.event, data, to=room, namespace=namespace, ignore_queue=True
            )
        else:
            await self._original_emit(message.event, data, to=room, namespace=namespace)
        return True

    def _deliver_sync(self, message: SocketEvent) -> bool:
        """:meth:`_deliver` for the synchronous ``socketio.Server`` (no recovery)."""
        namespace, room = message.namespace, message.room
        if self.confirm and not self._live(namespace, room):
            return False
        extra = {"ignore_queue": True} if message.ignore_queue else {}
        self._original_emit(message.event, message.data, to=room, namespace=namespace, **extra)
        return True

    def _live(self, namespace: str, room: Any) -> bool:
        """Whether the room has a member whose Engine.IO session is live: the member's socket
        found live last time while it is still open, else a look at every member."""
        socket = self._carriers.get((namespace, room))
        if socket is not None and not socket.closed:
            return True
        return self._scan(namespace, room)

    def _scan(self, namespace: str, room: Any) -> bool:
        server = self.server
        members = server.manager.rooms.get(namespace, _NO_ROOMS).get(room)  # sid <-> eio sid
        if members is not None:
            sockets = server.eio.sockets
            # A room is a bidict; python-socketio reads its forward dict (``_fwdm``) itself,
            # and so do we: its values are the eio sids, at a fraction of the bidict's cost.
            for eio_sid in getattr(members, "_fwdm", members).values():
                socket = sockets.get(eio_sid)
                if socket is not None and not socket.closed:
                    self._carriers[(namespace, room)] = socket
                    return True
        self._carriers.pop((namespace, room), None)
        return False

    # ------------------------------------------------------------ rooms

    def _entered(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = wrapped(*args, **kwargs)
        sid, namespace, room = _room_call(args, kwargs)
        thread = self._thread(namespace, room)
        if thread is not None:
            try:
                if self.recovery:
                    self.sessions.entered(namespace, sid, room)
                self.guard.mark_connected(thread, (namespace, sid))
            except Exception:
                log.exception("emitguard could not record that %s entered %r", sid, room)
        return result

    def _left(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        sid, namespace, room = _room_call(args, kwargs)
        self._carriers.pop((namespace, room), None)
        if self.recovery and room is not None:
            self.sessions.left(namespace, sid, room, instance.is_connected(sid, namespace))
        result = wrapped(*args, **kwargs)
        thread = self._thread(namespace, room)
        if thread is not None:
            try:
                self.guard.leave(thread, (namespace, sid), f"{sid} left {room!r}")
                if self.shared and self.recovery and room not in instance.rooms.get(namespace, {}):
                    self.sessions.cursors.pop(thread, None)  # delivered here no more
            except Exception:
                log.exception("emitguard could not record that %s left %r", sid, room)
        return result

    def _thread(self, namespace: str, room: Any) -> Hashable | None:
        """The guard's thread of a room (``None``: not guarded)."""
        if room is None:
            return None
        if not self.shared:
            return (namespace, room)
        return room_thread(namespace, room) if isinstance(room, str) else None

    # ------------------------------------------------------------ recovery

    async def _connecting(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        eio_sid, namespace, auth = [*args, None, None, None][:3]
        key = (eio_sid, namespace or "/")
        self.sessions.restoring[key] = auth
        try:
            return await wrapped(*args, **kwargs)
        finally:
            self.sessions.restoring.pop(key, None)

    async def _pre_connect(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        eio_sid, namespace = [*args, None, None][:2]
        sessions = self.sessions
        auth = sessions.restoring.get((eio_sid, namespace))
        try:
            claim = await sessions.claim(namespace, auth)
            if claim is not None:
                sid = await sessions.restore(
                    instance, eio_sid, namespace, claim, authorised=self.skip_connect_handler
                )
                if sid is not None:
                    return sid
        except Exception:
            log.exception("emitguard could not recover the session of %s", eio_sid)
        sid = await wrapped(*args, **kwargs)
        if sid is not None:
            sessions.opened(namespace, sid)
        return sid

    async def _send_packet(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        packet: Any = args[1] if len(args) > 1 else kwargs.get("pkt")
        data = getattr(packet, "data", None)
        if isinstance(data, dict) and "sid" in data and packet.packet_type == _CONNECT:
            session = self.sessions.live.get((packet.namespace or "/", data["sid"]))
            if session is not None:
                packet.data = {**data, "pid": session.pid}
        return await wrapped(*args, **kwargs)

    async def _trigger_event(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if args[0] != "connect" or len(args) < 3:
            return await wrapped(*args, **kwargs)
        key = (args[1] or "/", args[2])
        sessions = self.sessions
        if key not in sessions.recovered:
            return await wrapped(*args, **kwargs)
        if self.skip_connect_handler:  # as Socket.IO's skipMiddlewares: it is trusted
            if key in sessions.deferred and not await sessions.complete(instance.manager, *key):
                sessions.refused(*key)
                return False
            return True
        try:  # the app's connect handler authorises the recovery before anything is sent
            accepted = await wrapped(*args, **kwargs)
        except BaseException:
            sessions.refused(*key)
            raise
        if accepted is False:
            sessions.refused(*key)
        elif key in sessions.deferred and not await sessions.complete(instance.manager, *key):
            log.warning(
                "session %s: the replay window moved past it while its connect handler ran; "
                "refused, so that its client starts a fresh session",
                key[1],
            )
            sessions.refused(*key)
            return False
        return accepted

    async def _client_disconnect(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        eio_sid, namespace, reason = [*args, None, None, None][:3]
        reason = kwargs.get("reason", reason)
        if reason is None or reason == instance.reason.CLIENT_DISCONNECT:  # on purpose
            namespace = namespace or "/"
            sid = instance.manager.sid_from_eio_sid(eio_sid, namespace)
            if sid is not None:
                self.sessions.closing(namespace, sid)
        return await wrapped(*args, **kwargs)

    async def _server_disconnect(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        sid, namespace = [*args, None, None][:2]
        self.sessions.closing(kwargs.get("namespace", namespace) or "/", sid)
        return await wrapped(*args, **kwargs)


_CONNECT = 0
"""Socket.IO's CONNECT packet type."""

_NO_ROOMS: dict[Any, Any] = {}
"""A namespace with no rooms (read only)."""


def _with_offset(
    args: tuple[Any, ...], kwargs: dict[str, Any], offset: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An emit's arguments with ``offset`` appended to its data."""
    if len(args) > 1:
        data = args[1]
        return (args[0], (*_arguments(data), offset), *args[2:]), kwargs
    data = kwargs.get("data")
    return args, {**kwargs, "data": (*_arguments(data), offset)}


def _one(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rebind a guarded emit's delivery (``_deliver(message)``) to another message."""
    return (message,), kwargs


def _two(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rebind a shared delivery (``_deliver_shared(thread, message)``) to another message."""
    return (args[0], message), kwargs


def _stored(message: SocketEvent) -> dict[str, Any] | None:
    """A room emit as the Redis log keeps it (JSON); ``None`` (passed through, logged) when
    its room is not a str or its data is not JSON."""
    stored = {
        "event": message.event,
        "args": list(_arguments(message.data)),
        "namespace": message.namespace,
        "room": message.room,
    }
    try:
        if not isinstance(message.room, str):
            raise TypeError(f"room {message.room!r} is not a str")
        json.dumps(stored)
    except (TypeError, ValueError) as exc:
        log.warning(
            "emitguard passes %r to %r through unguarded (this worker's clients only): the "
            "Redis outbox keeps str rooms and JSON data (%s)",
            message.event,
            message.room,
            exc,
        )
        return None
    return stored


def _unchanged(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def _event(
    event: Any,
    data: Any = MISSING,
    to: Any = None,
    room: Any = None,
    skip_sid: Any = None,
    namespace: str | None = None,
    callback: Any = None,
    ignore_queue: bool = False,
    **_: Any,
) -> SocketEvent:
    """An ``emit`` call, bound as python-socketio binds its arguments, as the guard keeps it
    (a call of this, not a dict: the emit path is hot)."""
    target = to if to is not None else room
    return SocketEvent(  # (positional: cheaper)
        event,
        None if data is MISSING else data,
        namespace or "/",
        target,
        0,
        "",
        ignore_queue,
        target is None
        or skip_sid is not None
        or callback is not None
        or isinstance(target, (list, tuple, set)),
        callback is not None,
    )


def _room_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str, Any]:
    values = dict(zip(("sid", "namespace", "room"), args, strict=False))
    values.update(kwargs)
    return values.get("sid"), values.get("namespace") or "/", values.get("room")


def guard_server(
    server: Any,
    *,
    recovery: bool = False,
    max_disconnection_duration: float = 120.0,
    skip_connect_handler: bool = True,
    confirm: bool = True,
    **options: Any,
) -> SocketIOGuard:
    """Guard a python-socketio ``AsyncServer``, or a synchronous ``socketio.Server`` (then
    without recovery), see the module docstring; ``options`` go to
    :class:`emitguard.Guard` (``history`` defaults to 1000 per room with ``recovery``).

    ``max_disconnection_duration`` and ``skip_connect_handler`` are Socket.IO's
    ``connectionStateRecovery`` options (``skipMiddlewares``): how long a session is kept for
    its client's return, and whether the app's connect handler runs again for a recovered
    session (by default not: the session was authorised when it began). ``confirm``: count
    a delivery only when the room has a member with a live Engine.IO session (turn it off
    with a message-queue client manager, whose members on other servers this process cannot
    see)."""
    if not hasattr(server, "manager") or not hasattr(server, "eio"):
        raise AdapterError(
            f"guard_server() takes a python-socketio AsyncServer or Server, got {server!r}"
        )
    if not isinstance(max_disconnection_duration, (int, float)) or max_disconnection_duration <= 0:
        raise ValueError(
            f"max_disconnection_duration must be > 0 seconds, got {max_disconnection_duration!r}"
        )
    if recovery and not inspect.iscoroutinefunction(server.emit):
        raise AdapterError(
            "recovery=True needs a python-socketio AsyncServer; the synchronous socketio.Server "
            "is guarded without it (emits wait for nobody, buffer while a room is empty, and "
            "flush in order when someone enters it)"
        )
    if recovery:
        options.setdefault("history", 1000)
        if not options["history"]:
            raise ValueError("recovery=True needs a replay window: history must be >= 1")
    outbox = options.get("outbox")
    if isinstance(outbox, str):
        outbox = options["outbox"] = from_url(outbox)
    shared = bool(getattr(outbox, "shared", False))
    adapter_box: list[SocketIOGuard] = []
    if shared:  # the Redis outbox: rooms (and recovery) across workers, see _sio_shared
        if not inspect.iscoroutinefunction(server.emit):
            raise AdapterError(
                "a shared (Redis) outbox needs a python-socketio AsyncServer; the synchronous "
                "socketio.Server is guarded with the memory outbox only"
            )

        async def deliver(thread_id: str, message: dict[str, Any]) -> bool:
            return await adapter_box[0]._deliver_shared(thread_id, message)

        options["deliver"] = deliver
        options["stamp_seq"] = "seq"  # the relay hands each entry with its seq and epoch
    options.setdefault("name", f"socketio-{id(server):x}")
    guard = Guard(**options)
    adapter = SocketIOGuard(
        server,
        guard,
        recovery=recovery,
        max_disconnection_duration=max_disconnection_duration,
        skip_connect_handler=skip_connect_handler,
        shared=shared,
    )
    if shared:
        adapter_box.append(adapter)
    adapter.confirm = confirm
    adapter.patch()
    return adapter
