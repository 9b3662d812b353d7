"""The Redis backend: the outbox, the seq and the replay window of every thread, shared by
every process of an app (``Guard(outbox="redis://host:6379/0")``).

Per thread, two keys in one Redis Cluster slot (the ``{thread}`` hash tag)::

    emitguard:{<thread>}:stream   the thread's log: entry id "<seq>-0", fields m (message
                                  JSON), t (event type), c (time.time() of the send)
    emitguard:{<thread>}:meta     hash: epoch, seq (the last one given), delivered (the
                                  highest seq a connection of the thread was handed)

plus ``emitguard:{<thread>}:owner`` (the id of the worker that holds a connection of the
thread, with a TTL its heartbeat renews), ``emitguard:{<thread>}:e:<emission id>`` (what an
append returned, so that a retried append is not added twice) and the pub/sub channel
``emitguard:{<thread>}:notices`` (``<epoch>:<seq>`` of every append).

One Lua script (:data:`APPEND`) assigns the seq and appends, atomically: ``HINCRBY`` on the
meta hash, ``XADD ... MAXLEN``, the expiry of both keys, the ``PUBLISH`` of a notice. When the
meta hash is missing (first use, expiry, a Redis restarted without its data) the script makes
a new random epoch and starts the log over: a cursor ``(epoch, seq)`` of the old epoch is then
answered with a resync, never with a silent gap.

Entries hold data only: the process holding the thread's connection delivers them with its own
send (see :mod:`emitguard._relay`). ``redis`` (the ``redis`` extra) is imported when the
backend first connects, so the engine keeps no hard dependency on it.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from emitguard._history import Replay
from emitguard.outbox import Outbox, OutboxEntry
from emitguard.records import event_type_of

__all__ = ["APPEND", "RedisOutbox", "Stored", "from_url"]

APPEND = """
local stream, meta, dedupe = KEYS[1], KEYS[2], KEYS[3]
local done = redis.call('GET', dedupe)
if done then
  return {done, 1}
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'delivered', 0)
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
redis.call('XADD', stream, 'MAXLEN', ARGV[5], seq .. '-0', 'm', ARGV[1], 't', ARGV[2], 'c', ARGV[3])
redis.call('PEXPIRE', stream, ARGV[6])
redis.call('PEXPIRE', meta, ARGV[6])
local ref = epoch .. ':' .. seq
redis.call('SET', dedupe, ref, 'PX', ARGV[8])
redis.call('PUBLISH', ARGV[7], ref)
return {ref, 0}
"""
"""KEYS: stream, meta, dedupe key. ARGV: message JSON, event type, created (time.time()),
a new epoch (used only when the meta hash is missing), MAXLEN, expiry of the log (ms), the
notice channel, expiry of the dedupe key (ms). Returns ``{"<epoch>:<seq>", duplicate}``."""

ADVANCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return -1 end
local seen = tonumber(redis.call('HGET', KEYS[1], 'delivered') or '0')
if tonumber(ARGV[1]) > seen then redis.call('HSET', KEYS[1], 'delivered', ARGV[1]) end
return seen
"""
"""KEYS: meta. ARGV: seq, epoch. Raise ``delivered`` (never lower it, never in another epoch,
never create the hash); returns the mark it found (-1: no log, or another epoch)."""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Stored:
    """One entry of a thread's log, as read back."""

    seq: int
    message: Any
    event_type: str | None
    created_at: float


class RedisOutbox(Outbox):
    """The outbox of every process of an app, in Redis (see the module docs for the keys).

    Beyond the :class:`~emitguard.outbox.Outbox` contract it assigns the seq itself
    (:meth:`append`), keeps the replay window (:meth:`replay`), and tells the processes that
    hold a thread's connections of new entries (notices). ``shared = True`` tells a
    :class:`~emitguard.Guard` to route its sends through it (:mod:`emitguard._relay`).

    Knobs (also as URL query parameters): ``maxlen`` entries per thread kept for replay,
    ``history_ttl`` seconds a quiet thread's log lives, ``outage_ttl`` seconds a send waits
    in the local buffer for Redis to come back before it is EXPIRED, ``max_local`` sends the
    local buffer holds (past it, new sends are DROPPED), ``timeout`` seconds per Redis call,
    ``max_connections`` in the pool (more concurrent calls wait for a free one), ``cluster``
    (``?cluster=1``): the URL names one node of a Redis Cluster, and the client is redis-py's
    ``RedisCluster`` (every key of a thread is in the thread's slot; notices are classic
    pub/sub, which a cluster forwards to every node, read from one node).
    """

    shared = True
    synchronous = False

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        maxlen: int = 1000,
        history_ttl: float = 86_400.0,
        outage_ttl: float = 30.0,
        max_local: int = 10_000,
        timeout: float = 1.0,
        max_connections: int = 50,
        prefix: str = "emitguard",
        cluster: bool = False,
    ) -> None:
        self.url = url
        self.maxlen = int(maxlen)
        self.history_ttl = float(history_ttl)
        self.outage_ttl = float(outage_ttl)
        self.max_local = int(max_local)
        self.timeout = float(timeout)
        self.max_connections = int(max_connections)
        self.prefix = prefix
        self.cluster = bool(cluster)
        self._client: Any = None
        self._sync: Any = None
        self._script: Any = None
        self._advance: Any = None
        self._release: Any = None

    def __repr__(self) -> str:
        return f"<RedisOutbox {_safe(self.url)}>"

    # ------------------------------------------------------------ connection

    @property
    def client(self) -> Any:
        """The ``redis.asyncio.Redis`` (or ``RedisCluster``) client (made on first use)."""
        if self._client is None:
            self._client = self._cluster_client() if self.cluster else self._pooled_client()
            self._script = self._client.register_script(APPEND)
            self._advance = self._client.register_script(ADVANCE)
            self._release = self._client.register_script(RELEASE)
        return self._client

    def _pooled_client(self) -> Any:
        import redis.asyncio as aioredis  # the `redis` extra; imported only when used
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as Broken

        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            # a connection Redis closed (a restart) is retried once, on a new one; a
            # timeout is not (the relay decides; its appends are idempotent)
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
            retry_on_error=[Broken],
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            max_connections=self.max_connections,
            timeout=self.timeout * 5,  # waiting for a free connection, not for Redis
        )
        return aioredis.Redis.from_pool(pool)  # it owns the pool (closes it)

    def _cluster_client(self) -> Any:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            max_connections=self.max_connections,  # per node
        )

    def errors(self) -> tuple[type[BaseException], ...]:
        """What a Redis call raises when Redis is unreachable, slow or failing."""
        import redis.exceptions

        return (
            redis.exceptions.RedisError,
            redis.exceptions.RedisClusterException,  # (not a RedisError: no node answered)
            OSError,
            TimeoutError,
        )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    # ------------------------------------------------------------------ keys

    def key(self, thread_id: Hashable, part: str) -> str:
        """``<prefix>:{<thread>}:<part>``: every key of a thread in one Cluster slot."""
        return f"{self.prefix}:{{{thread_id}}}:{part}"

    def channel(self, thread_id: Hashable) -> str:
        """The pub/sub channel of the thread's notices."""
        return self.key(thread_id, "notices")

    def thread_of(self, channel: str) -> str:
        """The thread of a notice channel."""
        return channel[len(self.prefix) + 2 : -len("}:notices")]

    # -------------------------------------------------------------- the log

    def check(self, message: Any) -> str | None:
        why = super().check(message)
        if why is not None:
            return why
        try:
            json.dumps(message)
        except (TypeError, ValueError) as exc:
            return f"message cannot be stored in Redis as JSON ({exc})"
        return None

    async def append(
        self, thread_id: Hashable, message: Any, created_at: float, emission: str
    ) -> tuple[str, int, bool]:
        """Give the message the thread's next seq and add it to the log, atomically.

        ``emission`` identifies this emission: appending it again (a retry after a timeout
        whose first try did land) returns the first answer and adds nothing. Returns
        ``(epoch, seq, duplicate)``.
        """
        client = self.client
        ttl_ms = max(int(self.history_ttl * 1000), 1)
        dedupe_ms = max(int(max(self.outage_ttl * 4, 600.0) * 1000), 1)
        ref, duplicate = await self._script(
            keys=[
                self.key(thread_id, "stream"),
                self.key(thread_id, "meta"),
                self.key(thread_id, f"e:{emission}"),
            ],
            args=[
                json.dumps(message, separators=(",", ":")),
                event_type_of(message) or "",
                repr(created_at),
                secrets.token_hex(6),
                self.maxlen,
                ttl_ms,
                self.channel(thread_id),
                dedupe_ms,
            ],
            client=client,
        )
        epoch, _, seq = str(ref).rpartition(":")
        return epoch, int(seq), bool(int(duplicate))

    async def read(
        self, thread_id: Hashable, after: int, count: int = 100
    ) -> tuple[str | None, list[Stored]]:
        """The thread's epoch and up to ``count`` entries with ``seq > after``, in order."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.key(thread_id, "meta"), "epoch")
            pipe.xrange(self.key(thread_id, "stream"), f"{after + 1}-0", "+", count=count)
            epoch, rows = await pipe.execute()
        return epoch, [_stored(row) for row in rows]

    async def position(self, thread_id: Hashable) -> tuple[str | None, int, int]:
        """``(epoch, latest seq, delivered seq)`` of the thread (``None, 0, 0``: no log)."""
        epoch, seq, delivered = await self.client.hmget(
            self.key(thread_id, "meta"), ["epoch", "seq", "delivered"]
        )
        return epoch, int(seq or 0), int(delivered or 0)

    async def advance(self, thread_id: Hashable, epoch: str, seq: int) -> int | None:
        """Note that a connection of the thread was handed everything up to ``seq``. Returns
        the mark before (entries up to it were handed over already, by whichever process:
        their records are made), or ``None`` when the log has another epoch or none."""
        self.client  # noqa: B018 - makes the scripts
        seen = int(await self._advance(keys=[self.key(thread_id, "meta")], args=[seq, epoch]))
        return None if seen < 0 else seen

    # ---------------------------------------------------------------- replay

    async def replay(self, thread_id: Hashable, after: int, epoch: str | None = None) -> Replay:
        """What a client whose cursor is ``(epoch, after)`` missed, from the log."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.key(thread_id, "meta"), ["epoch", "seq"])
            pipe.xrange(self.key(thread_id, "stream"), f"{after + 1}-0", "+")
            pipe.xrange(self.key(thread_id, "stream"), "-", "+", count=1)
            (current, latest), rows, first = await pipe.execute()
        return _replay(after, epoch, current, int(latest or 0), rows, first)

    def replay_sync(self, thread_id: Hashable, after: int, epoch: str | None = None) -> Replay:
        """:meth:`replay` with a blocking client (for :meth:`Guard.replay` in sync code)."""
        if self._sync is None:
            import redis
            import redis.cluster

            kind = redis.cluster.RedisCluster if self.cluster else redis.Redis
            self._sync = kind.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )
        with self._sync.pipeline(transaction=False) as pipe:
            pipe.hmget(self.key(thread_id, "meta"), ["epoch", "seq"])
            pipe.xrange(self.key(thread_id, "stream"), f"{after + 1}-0", "+")
            pipe.xrange(self.key(thread_id, "stream"), "-", "+", count=1)
            (current, latest), rows, first = pipe.execute()
        return _replay(after, epoch, current, int(latest or 0), rows, first)

    # ------------------------------------------------------------- presence

    async def claim(self, thread_ids: Collection[str], worker: str, ttl: float) -> None:
        """Say that ``worker`` holds a connection of each thread, for ``ttl`` seconds."""
        if not thread_ids:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for thread_id in thread_ids:
                pipe.set(self.key(thread_id, "owner"), worker, px=max(int(ttl * 1000), 1))
            await pipe.execute()

    async def release(self, thread_id: Hashable, worker: str) -> None:
        """``worker`` no longer holds a connection of the thread."""
        self.client  # noqa: B018 - makes the scripts
        await self._release(keys=[self.key(thread_id, "owner")], args=[worker])

    async def owner(self, thread_id: Hashable) -> str | None:
        """The worker that holds a connection of the thread, if any."""
        found: str | None = await self.client.get(self.key(thread_id, "owner"))
        return found

    # ------------------------------------------- the Outbox contract (pending part)
    # Entries not yet handed to a connection (seq > delivered) are the outbox proper.

    async def push(self, entry: OutboxEntry) -> None:
        """Append ``entry``; the backend gives it its seq (``entry.seq`` is overwritten)."""
        _, entry.seq, _ = await self.append(
            entry.thread_id, entry.message, entry.created_at, uuid.uuid4().hex
        )

    async def _pending(self, thread_id: Hashable, count: int | None = None) -> list[OutboxEntry]:
        epoch, _, delivered = await self.position(thread_id)
        if epoch is None:
            return []
        rows = await self.client.xrange(
            self.key(thread_id, "stream"), f"{delivered + 1}-0", "+", count=count
        )
        return [_entry(thread_id, _stored(row)) for row in rows]

    async def head(self, thread_id: Hashable) -> OutboxEntry | None:
        found = await self._pending(thread_id, 1)
        return found[0] if found else None

    async def remove(self, thread_id: Hashable, seq: int) -> bool:
        epoch, _, delivered = await self.position(thread_id)
        if epoch is None or seq <= delivered:
            return False
        await self.advance(thread_id, epoch, seq)
        return True

    async def evict_oldest(
        self,
        thread_id: Hashable | None,
        protect: Collection[str],
        in_flight: Collection[tuple[str, int]] = (),
    ) -> OutboxEntry | None:
        """The oldest evictable entry of one thread (``XDEL``); ``None`` for the global
        bound, which the stream's ``MAXLEN`` takes the place of."""
        if thread_id is None:
            return None
        for entry in await self._pending(thread_id):
            if entry.event_type not in protect and (thread_id, entry.seq) not in in_flight:
                await self.client.xdel(self.key(thread_id, "stream"), f"{entry.seq}-0")
                return entry
        return None

    async def expire(self, thread_id: Hashable, created_before: float) -> list[OutboxEntry]:
        wall = time.time() - (time.monotonic() - created_before)
        gone = [e for e in await self._pending(thread_id) if e.created_at < wall]
        if gone:
            await self.client.xdel(self.key(thread_id, "stream"), *[f"{e.seq}-0" for e in gone])
        return gone

    async def entries(self, thread_id: Hashable) -> list[OutboxEntry]:
        return await self._pending(thread_id)


def from_url(url: str) -> RedisOutbox:
    """A :class:`RedisOutbox` from ``redis://`` (or ``rediss://``, ``unix://``) URL; the
    backend's knobs may ride in the query: ``?maxlen=500&outage_ttl=10``."""
    parts = urlsplit(url)
    knobs: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query):
        if name in ("maxlen", "max_local", "max_connections"):
            knobs[name] = int(value)
        elif name in ("history_ttl", "outage_ttl", "timeout"):
            knobs[name] = float(value)
        elif name == "prefix":
            knobs[name] = value
        elif name == "cluster":
            knobs[name] = value.lower() in ("1", "true", "yes")
        else:
            rest.append((name, value))
    query = "&".join(f"{name}={value}" for name, value in rest)
    return RedisOutbox(urlunsplit(parts._replace(query=query)), **knobs)


def worker_id() -> str:
    """An id for this process that no other process, here or elsewhere, shares."""
    return f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _stored(row: Any) -> Stored:
    entry_id, fields = row
    return Stored(
        seq=int(str(entry_id).partition("-")[0]),
        message=json.loads(fields["m"]),
        event_type=fields.get("t") or None,
        created_at=float(fields.get("c", 0.0)),
    )


def _entry(thread_id: Hashable, stored: Stored) -> OutboxEntry:
    return OutboxEntry(
        thread_id=thread_id,
        seq=stored.seq,
        message=stored.message,
        event_type=stored.event_type,
        created=time.monotonic() - (time.time() - stored.created_at),
        created_at=stored.created_at,
    )


def _replay(
    after: int, epoch: str | None, current: str | None, latest: int, rows: Any, first: Any
) -> Replay:
    if current is None:  # no log: never written, expired, or lost with Redis's data
        return Replay([], complete=after == 0 and epoch is None, latest=0, epoch=None)
    if epoch is not None and epoch != current:
        return Replay([], complete=False, latest=latest, epoch=current)
    messages = [(s.seq, s.message) for s in map(_stored, rows)]
    if messages:  # an append that landed between the pipeline's reads: it is in the rows
        latest = max(latest, messages[-1][0])
    floor = _stored(first[0]).seq if first else latest + 1
    complete = floor <= after + 1 and after <= latest
    return Replay(messages, complete=complete, latest=latest, epoch=current)
