"""A guarded python-socketio server on the Redis outbox: room emits and connection state
recovery across worker processes (``guard_server(sio, outbox="redis://...")``).

Rooms. A guarded emit to a room is appended to the room's log in Redis (a thread keyed by
:func:`room_thread`; the message a JSON dict: event, arguments, namespace, room), and every
worker that holds a member of the room hands it to its own members (the relay's ``deliver``),
in seq order, once.

Recovery. Offsets are ``<tag>.<s0>.<s1>...``: per session, the last seq written to it in each
room it ever entered (its *slots*, in the order it entered them; the sid room first), so the
offset a client sends back tells its position in every room, on any worker. Each room event is
written to each local member on its own, with that member's offset. The session's record in
Redis (``<prefix>:sio:<namespace>:<pid>``: sid, tag, slots, and per current room its slot, the
seq it had when the session entered it and its epoch) is written when the session opens and
when it enters or leaves a room, with a TTL of ``max_disconnection_duration`` that the owning
worker renews while the client is connected; a session closed on purpose is deleted. A worker
a client comes back to reads the record, decodes the offset against it, enters the session's
rooms under the session's lock (live deliveries to it wait), replays each room's log after
the client's position (or, when one log no longer covers it or its epoch changed, makes a fresh
session: no partial replay), and answers with the same ``pid``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any

from emitguard.redis_outbox import worker_id
from emitguard_adapters._sio_patch import original as _original
from emitguard_adapters._sio_recovery import close_stale, forget

if TYPE_CHECKING:
    from emitguard_adapters.socketio import SocketIOGuard

log = logging.getLogger("emitguard.adapters.socketio")

WRITE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[4] ~= '1' and owner and owner ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'data', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
"""KEYS: the session record. ARGV: owner id, the record's JSON ('' deletes it), TTL (ms),
'1' to take the record over (a recovery). A worker that no longer owns the session (its client
recovered elsewhere) writes nothing."""


def room_thread(namespace: str, room: str) -> str:
    """The thread id of a room in Redis (a str: the log is keyed by text)."""
    return json.dumps([namespace, room], separators=(",", ":"))


@dataclasses.dataclass(slots=True)
class Spot:
    """A room a shared session is in."""

    slot: int
    entry: int | None
    """The room's seq when the session entered it (None: not known yet)."""
    epoch: str | None


@dataclasses.dataclass(slots=True)
class SharedSession:
    """A Socket.IO session whose record lives in Redis."""

    pid: str
    sid: str
    tag: str
    owner: str
    slots: list[str]
    """Every room the session entered, in that order (a room keeps its slot)."""
    seen: list[int]
    """The last seq written to the session, per slot."""
    rooms: dict[str, Spot]
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    recoverable: bool = True
    taking: bool = False
    """Its next record write takes the record over (a recovery on this worker)."""

    def offset(self) -> str:
        return self.tag + "." + ".".join(map(str, self.seen))

    def record(self) -> str:
        rooms = {room: [spot.slot, spot.entry, spot.epoch] for room, spot in self.rooms.items()}
        return json.dumps({"sid": self.sid, "tag": self.tag, "slots": self.slots, "rooms": rooms})

    def enter(self, room: str, entry: int | None, epoch: str | None) -> None:
        if room in self.rooms:
            return
        if room in self.slots:
            slot = self.slots.index(room)
        else:
            slot = len(self.slots)
            self.slots.append(room)
            self.seen.append(0)
        self.rooms[room] = Spot(slot, entry, epoch)


class SharedSessions:
    """Recovery's state of one guarded server on the Redis outbox (the interface of
    :class:`~emitguard_adapters._sio_recovery.Sessions`)."""

    def __init__(self, adapter: SocketIOGuard, max_disconnection_duration: float) -> None:
        self.adapter = adapter
        self.max_disconnection_duration = max_disconnection_duration
        self.worker = worker_id()
        self.live: dict[tuple[str, str], SharedSession] = {}
        self.sids: dict[tuple[str, str], str] = {}
        self.restoring: dict[tuple[str, str], Any] = {}
        self.recovered: set[tuple[str, str]] = set()
        self.deferred: dict[tuple[str, str], SharedSession] = {}
        self.cursors: dict[str, tuple[str | None, int]] = {}
        """Room thread -> (epoch, seq) of the last entry handed to this worker's members."""
        self._writes: dict[str, tuple[str, str, int, bool]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._script: Any = None

    @property
    def outbox(self) -> Any:
        return self.adapter.guard.outbox

    def key(self, namespace: str, pid: str) -> str:
        return f"{self.outbox.prefix}:sio:{namespace}:{pid}"

    # ------------------------------------------------------------ sessions

    def opened(self, namespace: str, sid: str, pid: str | None = None) -> SharedSession:
        session = SharedSession(
            pid or secrets.token_urlsafe(12),
            sid,
            secrets.token_hex(4),
            f"{self.worker}:{secrets.token_hex(3)}",
            [sid],
            [0],
            {sid: Spot(0, 0, None)},  # a new sid: its room's log starts with the session
        )
        self.live[(namespace, sid)] = session
        self.sids[(namespace, session.pid)] = sid
        self._changed(namespace, sid)
        return session

    def entered(self, namespace: str, sid: str, room: Any) -> None:
        session = self.live.get((namespace, sid))
        if session is None or not isinstance(room, str) or room in session.rooms:
            return
        epoch, entry = self.cursors.get(room_thread(namespace, room), (None, None))
        session.enter(room, entry, epoch)
        self._changed(namespace, sid)

    def left(self, namespace: str, sid: str, room: Any, still_connected: bool) -> None:
        if room == sid:
            self.went(namespace, sid)
        elif still_connected:
            session = self.live.get((namespace, sid))
            if session is not None and session.rooms.pop(room, None) is not None:
                self._changed(namespace, sid)

    def closing(self, namespace: str, sid: str) -> None:
        session = self.live.get((namespace, sid))
        if session is not None:
            session.recoverable = False

    def went(self, namespace: str, sid: str, *, keep: bool = True) -> None:
        """The session's connection went: its record is kept for max_disconnection_duration
        from now (no longer renewed), or deleted (closed on purpose, or ``keep`` off)."""
        session = forget(self, namespace, sid)
        if session is not None:
            self._dirty.discard((namespace, sid))
            self._write(namespace, session, keep=keep and session.recoverable)

    def refused(self, namespace: str, sid: str) -> None:
        self.deferred.pop((namespace, sid), None)
        self.went(namespace, sid, keep=False)

    def next_offset(self) -> str:  # pragma: no cover - passed-through emits get none here
        raise NotImplementedError

    # ------------------------------------------------------------ delivery

    async def deliver(self, thread_id: str, message: dict[str, Any]) -> bool:
        """Write one room event to each live local member of the room, with its offset;
        False when no member here has a live session (kept in the log)."""
        adapter = self.adapter
        server = adapter.server
        namespace, room = message["namespace"], message["room"]
        seq, epoch = int(message.get("seq", 0)), message.get("epoch")
        members = server.manager.rooms.get(namespace, {}).get(room)
        if not members:
            return False
        args = tuple(message["args"])
        emit = adapter._original_emit
        sockets = server.eio.sockets
        handed = False
        for sid, eio_sid in list(members.items()):
            socket = sockets.get(eio_sid)
            if adapter.confirm and (socket is None or socket.closed):
                continue
            session = self.live.get((namespace, sid))
            if session is None:  # connected, not (or no longer) a recoverable session
                await emit(message["event"], args, to=sid, namespace=namespace)
                handed = True
                continue
            async with session.lock:  # a recovery writing its replay goes first
                spot = session.rooms.get(room)
                if spot is None:
                    continue
                if spot.epoch is not None and epoch is not None and epoch != spot.epoch:
                    session.seen[spot.slot] = 0  # the room's history was lost: seq restarts
                    spot.entry, spot.epoch = 0, epoch
                    self._changed(namespace, sid)
                if seq <= session.seen[spot.slot]:
                    handed = True  # the client has it (from a replay)
                    continue
                if spot.entry is None or spot.epoch is None:
                    spot.entry = seq - 1 if spot.entry is None else spot.entry
                    spot.epoch = epoch
                    self._changed(namespace, sid)
                session.seen[spot.slot] = seq
                await emit(message["event"], (*args, session.offset()), to=sid, namespace=namespace)
                handed = True
        if handed:
            self.cursors[thread_id] = (epoch, seq)
        return handed

    # ------------------------------------------------------------ restoring

    async def claim(self, namespace: str, auth: Any) -> Any:
        """The session a CONNECT's auth names and the client's position in each of its
        slots, when its record is in Redis and the offset is one of its own."""
        if not isinstance(auth, dict):
            return None
        pid, offset = auth.get("pid"), auth.get("offset")
        if not isinstance(pid, str) or not isinstance(offset, str):
            return None
        tag, _, rest = offset.partition(".")
        parts = rest.split(".")
        if not all(part.isdigit() for part in parts):
            return None
        await close_stale(self, namespace, pid)
        await self._flush()  # (this worker's own writes of it land first)
        found = await self.outbox.client.hget(self.key(namespace, pid), "data")
        if found is None:
            return None  # never known, expired (away too long), or closed on purpose
        record = json.loads(found)
        seen = [int(part) for part in parts]
        if record["tag"] != tag or len(seen) > len(record["slots"]):
            return None
        slots: list[str] = record["slots"]
        seen += [0] * (len(slots) - len(seen))
        rooms = {room: Spot(*spot) for room, spot in record["rooms"].items()}
        for spot in rooms.values():
            if spot.entry is None and seen[spot.slot] == 0:
                return None  # nothing of the room reached it, and its entry is not known
            seen[spot.slot] = max(seen[spot.slot], spot.entry or 0)
        owner = f"{self.worker}:{secrets.token_hex(3)}"
        return SharedSession(pid, record["sid"], tag, owner, slots, seen, rooms, taking=True)

    async def restore(
        self, manager: Any, eio_sid: str, namespace: str, claim: Any, *, authorised: bool
    ) -> Any:
        """Connect ``eio_sid`` as the claimed session's sid (its rooms and what it missed
        follow in :meth:`complete`, run before the CONNECT answer)."""
        session: SharedSession = claim
        sid = session.sid
        if manager.is_connected(sid, namespace) or sid in manager.rooms.get(namespace, {}).get(
            None, {}
        ):
            return None
        if not await self._covered(namespace, session):
            return None
        try:
            manager.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
        except Exception:  # this Engine.IO session is in the namespace already (bidict)
            return None
        manager.pending_connect.setdefault(namespace, []).append(sid)
        self.live[(namespace, sid)] = session
        self.sids[(namespace, session.pid)] = sid
        self.recovered.add((namespace, sid))
        self.deferred[(namespace, sid)] = session
        return sid

    async def complete(self, manager: Any, namespace: str, sid: str) -> bool:
        """Enter the session's rooms again and write what it missed, room by room in seq
        order, before live deliveries to it go on; False when a room's log no longer covers
        it (nothing written)."""
        session = self.deferred.pop((namespace, sid))
        async with session.lock:
            manager.basic_enter_room(sid, namespace, sid)
            for room in session.rooms:
                if room != sid:
                    manager.basic_enter_room(sid, namespace, room)
            replays = await self._replays(namespace, session)
            if replays is None:
                return False
            emit = _original(self.adapter.server.emit)
            written = 0
            for room, replay in replays:
                slot = session.rooms[room].slot
                for seq, message in replay.messages:
                    if seq <= session.seen[slot]:
                        continue
                    session.seen[slot] = seq
                    data = (*message["args"], session.offset())
                    await emit(message["event"], data, to=sid, namespace=namespace)
                    written += 1
        self._changed(namespace, sid)
        log.debug("session %s recovered from redis: %d events replayed", sid, written)
        return True

    async def _covered(self, namespace: str, session: SharedSession) -> bool:
        # (a look: this worker's next delivery of the rooms must not skip what it read)
        return await self._replays(namespace, session, peek=True) is not None

    async def _replays(
        self, namespace: str, session: SharedSession, *, peek: bool = False
    ) -> list[Any] | None:
        guard = self.adapter.guard
        found = []
        for room, spot in session.rooms.items():
            after = session.seen[spot.slot]
            thread = room_thread(namespace, room)
            replay = await guard.areplay(thread, after, spot.epoch, peek=peek)
            if not replay.complete:
                return None
            found.append((room, replay))
        return found

    # ------------------------------------------------------------ records

    def _changed(self, namespace: str, sid: str) -> None:
        self._dirty.add((namespace, sid))
        self._kick()

    def _write(self, namespace: str, session: SharedSession, *, keep: bool) -> None:
        ttl = max(int(self.max_disconnection_duration * 1000), 1)
        data = session.record() if keep else ""
        self._writes[self.key(namespace, session.pid)] = (session.owner, data, ttl, session.taking)
        session.taking = False
        self._kick()

    def _kick(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._wake is None or self._writer is None or self._writer.done():
            self._wake = asyncio.Event()
            self._writer = loop.create_task(self._writing())
        self._wake.set()

    async def _writing(self) -> None:
        """Write the records that changed at once; renew every live one's TTL meanwhile."""
        assert self._wake is not None
        renew = min(self.max_disconnection_duration / 3, 5.0)
        while True:
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._wake.wait(), renew)
            if not self._wake.is_set():
                self._dirty.update(self.live)  # renew them all
            self._wake.clear()
            try:
                await self._flush()
            except Exception as exc:  # Redis away: the next round writes them again
                log.warning("emitguard could not write socketio sessions to redis: %s", exc)
                await asyncio.sleep(0.2)

    async def _flush(self) -> None:
        for namespace, sid in list(self._dirty):
            self._dirty.discard((namespace, sid))
            session = self.live.get((namespace, sid))
            if session is not None and (namespace, sid) not in self.deferred:
                self._write(namespace, session, keep=True)
        if not self._writes:
            return
        writes, self._writes = self._writes, {}
        client = self.outbox.client
        if self._script is None:
            self._script = client.register_script(WRITE)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for key, (owner, data, ttl, taking) in writes.items():
                    await self._script(
                        keys=[key], args=[owner, data, ttl, "1" if taking else "0"], client=pipe
                    )
                await pipe.execute()
        except BaseException:
            for key, value in writes.items():  # again next round (unless newer ones came)
                self._writes.setdefault(key, value)
            raise

    def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
