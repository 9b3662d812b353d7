"""Socket.IO 4.6's connection state recovery for python-socketio's ``AsyncClient``: what the
official JavaScript client does by itself (see ``_sio_recovery`` for the protocol)."""

from __future__ import annotations

from typing import Any

from emitguard_adapters._sio_patch import Guarded


class Recovery:
    """An ``AsyncClient``'s side of connection state recovery (see :func:`recovering`): the
    session's ``pid`` and the last offset received, sent back in the CONNECT auth."""

    def __init__(self, client: Any, auth: Any = None, namespace: str = "/") -> None:
        self.client = client
        self.namespace = namespace
        self.pid: str | None = None
        """The private id of the current (or last) session."""
        self.offset: str | None = None
        """The last offset received (the last argument of a recoverable event)."""
        self.recovered = False
        """Whether the last connection recovered the previous session (``socket.recovered``)."""
        self.duplicates = 0
        """Events dropped because their offset was not past the last one (none expected)."""
        self._auth = auth
        self._epoch = ""
        self._position = 0

    async def auth(self) -> dict[str, Any]:
        """The CONNECT auth: ``pid`` and ``offset`` (once known) with the app's own auth
        (``auth=`` given to :func:`recovering`), as ``socket.io-client`` sends them."""
        base = self._auth
        if callable(base):
            base = base()
            if hasattr(base, "__await__"):
                base = await base
        payload: dict[str, Any] = {}
        if self.pid is not None:
            payload["pid"] = self.pid
            if self.offset is not None:
                payload["offset"] = self.offset
        payload.update(base or {})
        return payload

    async def connected(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        namespace, data = [*args, None, None][:2]
        if (namespace or "/") == self.namespace and isinstance(data, dict):
            pid = data.get("pid")
            self.recovered = isinstance(pid, str) and pid == self.pid
            self.pid = pid if isinstance(pid, str) else None
            if not self.recovered:
                self.offset, self._epoch, self._position = None, "", 0
        return await wrapped(*args, **kwargs)

    async def disconnecting(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # On purpose: the session ends. (python-socketio's client closes its transport right
        # after its DISCONNECT packet, and the server may see only the transport closing.)
        self.pid = None
        return await wrapped(*args, **kwargs)

    async def trigger(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if (
            len(args) > 2
            and self.pid is not None
            and isinstance(offset := args[-1], str)
            and args[1] == self.namespace
        ):
            epoch, dot, numbers = offset.partition(".")
            parts = numbers.split(".")  # one number, or one per room on the Redis outbox
            if dot and all(part.isdigit() for part in parts):  # not the app's own string
                position = sum(map(int, parts))  # (each new event raises one of them)
                if epoch == self._epoch and position <= self._position:
                    self.duplicates += 1
                    return None  # seen before
                self._epoch, self._position, self.offset = epoch, position, offset
                args = args[:-1]  # the app's handlers see the event as it was emitted
        return await wrapped(*args, **kwargs)


def recovering(client: Any, auth: Any = None, namespace: str = "/") -> Recovery:
    """Give a python-socketio ``AsyncClient`` connection state recovery: pass
    ``auth=recovery.auth`` to ``client.connect()`` (the app's own auth goes to this call).
    The offset is taken off each event before the app's handlers see it."""
    recovery = Recovery(client, auth, namespace)
    client._handle_connect = Guarded(client._handle_connect, recovery.connected)
    client._trigger_event = Guarded(client._trigger_event, recovery.trigger)
    client.disconnect = Guarded(client.disconnect, recovery.disconnecting)
    return recovery
