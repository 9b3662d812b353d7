"""In-memory stand-in for a legacy WebSocket connection manager.

Chat and agent backends usually keep a *connection manager* that maps WebSocket
connections to users and to conversation threads. The incident that motivated
emitguard (events lost with ``Cannot deliver message for thread <id> - no
connections``) came from one such manager: a connection is registered when the
socket opens, it is tied to a thread only later by a synchronous
``update_connection_thread(user_id, thread_id)``, and ``send_to_thread`` simply
logs a warning and returns ``False`` when no connection is tied to the thread
yet. The event is then gone.

:class:`ReferenceManager` reproduces that behaviour in memory, faithfully and on
purpose, so that the guard, its adapters and the test suite can be exercised
against a realistic "legacy" target without a web server. Every socket is a
:class:`FakeSocket` that records what it received, and the manager keeps a
per-thread delivery log so tests can assert what actually reached the thread.
:class:`SyncReferenceManager` is the same manager with a synchronous
``send_to_thread``, for guarding synchronous originals.

This module is deliberately stand-alone: it uses the standard library only and
imports nothing from the rest of emitguard, because it plays the part of code
that emitguard does not own.

Example::

    import asyncio
    from emitguard.testing import ReferenceManager

    async def main() -> None:
        manager = ReferenceManager()
        socket = manager.connect("alice")
        # The race from the report: the agent emits before the association.
        assert await manager.send_to_thread("t1", {"type": "agent_started"}) is False
        assert manager.lost == 1
        manager.update_connection_thread("alice", "t1")
        assert await manager.send_to_thread("t1", {"type": "agent_thinking"})
        assert socket.received == [{"type": "agent_thinking"}]
        assert manager.received("t1") == [{"type": "agent_thinking"}]

    asyncio.run(main())

The manager is meant to be driven from one thread (one event loop); it does no
locking.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

__all__ = ["FakeSocket", "ReferenceManager", "SyncReferenceManager"]

DEFAULT_LOGGER_NAME = "emitguard.testing.legacy"


class FakeSocket:
    """A fake WebSocket connection that records every message it accepts.

    Attributes:
        connection_id: Identifier of the connection inside its manager.
        user_id: The user that owns the connection.
        received: Messages accepted by this socket, in arrival order. The
            objects are stored as given, not copied.
        closed: ``True`` once :meth:`close` was called; sends then fail.
        fail_next: Fault injection. While it is greater than zero, the next
            send raises :class:`ConnectionError` (recording nothing) and the
            counter is decremented.
    """

    def __init__(self, connection_id: str, user_id: str) -> None:
        self.connection_id = connection_id
        self.user_id = user_id
        self.received: list[Any] = []
        self.closed = False
        self.fail_next = 0

    def __repr__(self) -> str:
        return (
            f"FakeSocket(connection_id={self.connection_id!r}, "
            f"user_id={self.user_id!r}, received={len(self.received)}, "
            f"closed={self.closed})"
        )

    async def send_json(self, message: Any) -> None:
        """Accept ``message`` (asynchronous API, like Starlette's WebSocket).

        Raises:
            ConnectionError: The socket is closed, or a failure was injected
                with :attr:`fail_next`.
        """
        self.send_json_nowait(message)

    def send_json_nowait(self, message: Any) -> None:
        """Accept ``message`` synchronously; same rules as :meth:`send_json`.

        Raises:
            ConnectionError: The socket is closed, or a failure was injected
                with :attr:`fail_next`.
        """
        if self.closed:
            raise ConnectionError(f"socket {self.connection_id} is closed")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError(f"socket {self.connection_id} failed (injected fault)")
        self.received.append(message)

    def close(self) -> None:
        """Mark the socket closed. Closing twice is harmless."""
        self.closed = True


class ReferenceManager:
    """In-memory legacy connection manager, with the incident's behaviour.

    Connections are registered per user by :meth:`connect` with no thread.
    :meth:`update_connection_thread` ties every registered connection of a
    user to one thread (a connection carries at most one thread; associating
    it again moves it). :meth:`send_to_thread` delivers to the connections
    tied to the thread and, when there are none, logs
    ``Cannot deliver message for thread <id> - no connections`` at WARNING
    and returns ``False``: the message is lost, exactly as in the report.

    Like the real manager, it only learns that a connection is dead when a
    send to it fails: a :class:`FakeSocket` closed behind the manager's back
    stays registered (and counts for :meth:`update_connection_thread`) until
    a send raises :class:`ConnectionError`, at which point the connection is
    closed and removed.

    Attributes:
        logger: Where the manager logs, ``emitguard.testing.legacy`` by default.
        testing: The report's dangerous TESTING shortcut, see ``__init__``.
        delivered_log: Per thread, every message that a socket accepted while
            tied to that thread, in delivery order. It holds one entry per
            socket that accepted the message ("per-socket copies"): a message
            sent to a thread with two connections appears twice. Entries are
            the message objects themselves. Prefer :meth:`received` to read it.
        lost: How many times :meth:`send_to_thread` returned ``False``.
    """

    def __init__(
        self,
        *,
        logger: logging.Logger | None = None,
        testing: bool = False,
    ) -> None:
        """Create an empty manager.

        Args:
            logger: Logger to use; defaults to ``emitguard.testing.legacy``.
            testing: **Deliberate bug.** When ``True``, :meth:`send_to_thread`
                returns ``True`` without sending anything, like the TESTING
                shortcut of the legacy manager in the report. It exists to
                show a manager that lies about success; never rely on it.
        """
        self.logger = logger if logger is not None else logging.getLogger(DEFAULT_LOGGER_NAME)
        self.testing = testing
        self.delivered_log: dict[str, list[Any]] = {}
        self.lost = 0
        # connection_id -> socket, in registration order.
        self._sockets: dict[str, FakeSocket] = {}
        # connection_id -> thread_id, only for associated connections.
        self._thread_by_connection: dict[str, str] = {}
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(connections={len(self._sockets)}, "
            f"threads={len(set(self._thread_by_connection.values()))}, "
            f"lost={self.lost}, testing={self.testing})"
        )

    # -- connection lifecycle -------------------------------------------------

    def connect(self, user_id: str, connection_id: str | None = None) -> FakeSocket:
        """Register a new connection for ``user_id``, tied to no thread yet.

        Args:
            user_id: Owner of the connection.
            connection_id: Identifier to use; ``conn-<n>`` (first free ``n``
                from a counter starting at 1) when ``None``.

        Returns:
            The new connection's socket.

        Raises:
            ValueError: ``connection_id`` is already registered.
        """
        if connection_id is None:
            connection_id = self._next_connection_id()
        elif connection_id in self._sockets:
            raise ValueError(f"connection {connection_id!r} is already registered")
        socket = FakeSocket(connection_id, user_id)
        self._sockets[connection_id] = socket
        self.logger.debug("Registered connection %s for user %s", connection_id, user_id)
        return socket

    def update_connection_thread(self, user_id: str, thread_id: str) -> bool:
        """Tie every registered connection of ``user_id`` to ``thread_id``.

        Synchronous, like the report's manager. A connection already tied to
        another thread moves to ``thread_id``.

        Returns:
            ``True`` if at least one connection was updated; otherwise
            ``False``, after logging ``No WebSocket connections found for
            user <user_id>`` at WARNING.
        """
        sockets = self.connections(user_id)
        if not sockets:
            self.logger.warning("No WebSocket connections found for user %s", user_id)
            return False
        for socket in sockets:
            self._thread_by_connection[socket.connection_id] = thread_id
        self.logger.debug(
            "Associated %d connection(s) of user %s with thread %s",
            len(sockets),
            user_id,
            thread_id,
        )
        return True

    def disconnect_user(self, user_id: str) -> None:
        """Close and remove every connection of ``user_id``."""
        for socket in self.connections(user_id):
            self._remove(socket.connection_id)

    def drop_connection(self, connection_id: str) -> None:
        """Close and remove one connection, simulating a network drop.

        Unknown or already removed connections are ignored.
        """
        self._remove(connection_id)

    # -- sending ----------------------------------------------------------------

    async def send_to_thread(self, thread_id: str, message: Any) -> bool:
        """Send ``message`` to every connection tied to ``thread_id``.

        Each socket gets ``await socket.send_json(message)``. A socket whose
        send raises :class:`ConnectionError` is treated as dropped: the error
        is logged and the connection closed and removed.

        Returns:
            ``True`` if at least one socket accepted the message. ``False``
            when no connection is tied to the thread (after logging
            ``Cannot deliver message for thread <id> - no connections`` at
            WARNING) or when every send failed; :attr:`lost` then grows by one.
            With ``testing=True``, always ``True`` and nothing is sent.
        """
        if self.testing:
            return self._testing_shortcut(thread_id)
        targets = self._targets(thread_id)
        if not targets:
            return self._report_no_connections(thread_id)
        delivered = 0
        for socket in targets:
            try:
                await socket.send_json(message)
            except ConnectionError as exc:
                self._report_send_failure(thread_id, socket, exc)
            else:
                self._record_delivery(thread_id, message)
                delivered += 1
        return self._conclude(thread_id, delivered, len(targets))

    # -- introspection ------------------------------------------------------------

    def connections(self, user_id: str | None = None) -> list[FakeSocket]:
        """Registered sockets, of ``user_id`` or of everyone, in connect order."""
        return [
            socket
            for socket in self._sockets.values()
            if user_id is None or socket.user_id == user_id
        ]

    def threads_of(self, user_id: str) -> set[str]:
        """Threads that the registered connections of ``user_id`` are tied to."""
        return {
            self._thread_by_connection[socket.connection_id]
            for socket in self.connections(user_id)
            if socket.connection_id in self._thread_by_connection
        }

    def received(self, thread_id: str) -> list[Any]:
        """A copy of :attr:`delivered_log` for ``thread_id`` (empty if none)."""
        return list(self.delivered_log.get(thread_id, ()))

    # -- shared internals (used by both send_to_thread flavours) -----------------

    def _next_connection_id(self) -> str:
        while True:
            candidate = f"conn-{next(self._ids)}"
            if candidate not in self._sockets:
                return candidate

    def _remove(self, connection_id: str) -> None:
        socket = self._sockets.pop(connection_id, None)
        self._thread_by_connection.pop(connection_id, None)
        if socket is not None:
            socket.close()
            self.logger.debug("Removed connection %s of user %s", connection_id, socket.user_id)

    def _targets(self, thread_id: str) -> list[FakeSocket]:
        """Snapshot of the sockets tied to ``thread_id``, in connect order."""
        return [
            socket
            for connection_id, socket in self._sockets.items()
            if self._thread_by_connection.get(connection_id) == thread_id
        ]

    def _testing_shortcut(self, thread_id: str) -> bool:
        self.logger.debug(
            "TESTING mode: reporting success for thread %s without sending",
            thread_id,
        )
        return True

    def _report_no_connections(self, thread_id: str) -> bool:
        self.lost += 1
        self.logger.warning(
            "Cannot deliver message for thread %s - no connections (active connections: %d)",
            thread_id,
            len(self._sockets),
        )
        return False

    def _report_send_failure(
        self, thread_id: str, socket: FakeSocket, exc: ConnectionError
    ) -> None:
        self.logger.error(
            "Send to connection %s (user %s) for thread %s failed: %s; removing connection",
            socket.connection_id,
            socket.user_id,
            thread_id,
            exc,
        )
        self._remove(socket.connection_id)

    def _record_delivery(self, thread_id: str, message: Any) -> None:
        self.delivered_log.setdefault(thread_id, []).append(message)

    def _conclude(self, thread_id: str, delivered: int, attempted: int) -> bool:
        if delivered:
            return True
        self.lost += 1
        self.logger.warning(
            "Cannot deliver message for thread %s - all %d connection(s) failed",
            thread_id,
            attempted,
        )
        return False


class SyncReferenceManager(ReferenceManager):
    """:class:`ReferenceManager` whose ``send_to_thread`` is synchronous.

    Delivery uses :meth:`FakeSocket.send_json_nowait`; everything else
    (selection, logging, failure handling, :attr:`lost`, the delivery log and
    the ``testing`` shortcut) is shared with the asynchronous manager. Used to
    check that synchronous originals are guarded correctly.
    """

    # The override changes the method from async to sync on purpose: this
    # class models a different legacy API shape, not a drop-in substitute.
    def send_to_thread(self, thread_id: str, message: Any) -> bool:  # type: ignore[override]
        """Synchronous :meth:`ReferenceManager.send_to_thread`, same contract."""
        if self.testing:
            return self._testing_shortcut(thread_id)
        targets = self._targets(thread_id)
        if not targets:
            return self._report_no_connections(thread_id)
        delivered = 0
        for socket in targets:
            try:
                socket.send_json_nowait(message)
            except ConnectionError as exc:
                self._report_send_failure(thread_id, socket, exc)
            else:
                self._record_delivery(thread_id, message)
                delivered += 1
        return self._conclude(thread_id, delivered, len(targets))
