"""Django Channels: guard a channel layer in one call, and confirm deliveries at the consumer.

``guard_layer(layer)`` guards a channel layer instance (``InMemoryChannelLayer``,
channels_redis's ``RedisChannelLayer``, or the default layer of ``CHANNEL_LAYERS`` when
``layer`` is omitted) through the manager adapter:

- ``group_send(group, message)`` is the send: the group is the thread;
- ``group_add(group, channel)`` is the association, owned by the channel;
- ``group_discard(group, channel)`` is the channel leaving that one group (it keeps its
  others).

``group_send`` only enqueues a message for the group's channels; it says nothing about a
consumer taking it. :class:`GuardedConsumerMixin`, put before the consumer class, tells the
guard when a frame really leaves the consumer (``transport.frame_sent`` with the consumer's
channel name) and when the consumer goes away; with it, ``guard_layer`` confirms each
delivery (``Guard.confirm_deliveries``): an event whose group's consumers sent no frame within
``confirm`` seconds (a dead consumer's queue) is not counted delivered; it is retried, kept,
and sent again after the group's next ``group_add``. A consumer whose handler is still running
is alive: its frame is waited for past ``confirm`` (``transport.handling``); one stuck past
``transport.BUSY_LIMIT`` gets its groups back with its next frame (``Guard.owner_alive``).

A message the layer drops for capacity (channels_redis over ``capacity``, the in-memory
layer's ``ChannelFull``) is not delivered either: it is retried and kept, its record says
"dropped by the channel layer for capacity" (:mod:`emitguard_adapters._channels_layer`).

:meth:`GuardedConsumerMixin.join_group` is ``group_add`` plus replay: a client that comes
back with the last ``seq`` it saw (``?after=<seq>`` in its URL) is sent what it missed of the
guard's replay window, through the consumer's own handlers, before the group's next event.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs

import emitguard
from emitguard import AdapterError, Guard, Replay, transport
from emitguard_adapters._channels_layer import TAG

__all__ = ["LAYER_OPTIONS", "GuardedConsumerMixin", "guard_layer"]

log = logging.getLogger("emitguard.adapters.channels")

LAYER_OPTIONS: dict[str, Any] = {
    "send": "group_send",
    "associate": "group_add",
    "leave": "group_discard",
    "thread_param": "group",
    "owner_param": "channel",
}
"""The manager adapter's options for a channel layer."""


def guard_layer(layer: Any = None, *, confirm: float | None = 0.5, **options: Any) -> Guard:
    """Guard a channel layer (default: ``channels.layers.get_channel_layer()``); ``options``
    go to :class:`emitguard.Guard`. ``confirm``: seconds a ``group_send`` waits for a
    consumer of the group (using :class:`GuardedConsumerMixin`) to send a frame before the
    event counts as not delivered; ``None`` counts the enqueue as the delivery."""
    if layer is None:
        from channels.layers import get_channel_layer  # type: ignore[import-untyped]

        layer = get_channel_layer()
        if layer is None:
            raise AdapterError("no channel layer: CHANNEL_LAYERS has no 'default' entry")
    missing = [
        name for name in ("group_send", "group_add", "group_discard") if not hasattr(layer, name)
    ]
    if missing:
        raise AdapterError(
            f"guard_layer() takes a channel layer with groups; {layer!r} has no "
            f"{', '.join(missing)}"
        )
    options.setdefault("name", f"channels-{type(layer).__name__}-{id(layer):x}")
    guard = emitguard.guard(layer, **LAYER_OPTIONS, **options)
    guard.confirm_deliveries(confirm)
    return guard


class GuardedConsumerMixin:
    """Put before a Channels websocket consumer class, async (``AsyncWebsocketConsumer``,
    ``AsyncJsonWebsocketConsumer``) or sync (``WebsocketConsumer``): each frame the consumer
    sends is confirmed to the guard of its channel layer (and tells it the consumer is alive,
    which reconnects its groups if slow confirmations had disconnected them), and the consumer
    ending (its socket closed, its ``disconnect`` handler run) is its channel, the owner,
    going away."""

    channel_name: str
    channel_layer: Any
    scope: Any

    _emitguard_tag: str | None = None
    """The tag of the guarded message being handled (its frames confirm that send)."""

    resume_param: str = "after"
    """The query-string parameter that carries the last ``seq`` a reconnecting client saw."""
    resync_code: int = 4409
    """The close code :meth:`replay_gap` uses by default."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        # (wrapped at the ASGI call, which both kinds of consumer share: a sync consumer's
        # handlers run in a worker thread, its frames still leave through this ``send``)
        guard: Guard | None = None

        async def confirmed_send(message: Any) -> None:
            nonlocal guard
            await send(message)
            if message.get("type") == "websocket.send":
                name = getattr(self, "channel_name", None)
                if name is not None:
                    transport.frame_sent(name, self._emitguard_tag)
                    if guard is None:
                        guard = emitguard.guarded(getattr(self, "channel_layer", None))
                    if guard is not None:
                        guard.owner_alive(name)

        try:
            return await super().__call__(scope, receive, confirmed_send)  # type: ignore[misc]
        finally:
            self._emitguard_gone()

    async def dispatch(self, message: Any) -> Any:
        # While a handler runs the consumer is alive: a confirmation waiting for its frame
        # waits on (a consumer slower than ``confirm`` is not taken for a dead one). A
        # guarded group_send's message carries its tag: the frames sent while it is handled
        # confirm that send (the tag is taken out: no handler sees it).
        outer = self._emitguard_tag  # (a handler may dispatch another: join_group's replay)
        mark = message.pop(TAG, None) if isinstance(message, dict) else None
        if mark is not None:
            self._emitguard_tag = mark
        name = getattr(self, "channel_name", None)
        try:
            if name is None:
                return await super().dispatch(message)  # type: ignore[misc]
            with transport.handling(name):
                return await super().dispatch(message)  # type: ignore[misc]
        finally:
            self._emitguard_tag = outer

    def resume_after(self) -> int | None:
        """The last ``seq`` the client says it saw (``?after=<seq>``, see
        :attr:`resume_param`), or ``None`` for a client that starts afresh."""
        raw = self.scope.get("query_string", b"")
        text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
        values = parse_qs(text).get(self.resume_param)
        if not values:
            return None
        try:
            after = int(values[-1])
        except ValueError:
            return None
        return after if after >= 0 else None

    async def join_group(self, group: str, after: int | None = None) -> Replay | None:
        """``group_add(group, channel_name)``, and for a client that comes back (``after``:
        the last ``seq`` it saw; by default :meth:`resume_after`) what it missed of the
        guard's replay window (``history=N``), dispatched to this consumer's own handlers
        (so it leaves in the consumer's wire format) before any newer event of the group.
        Call it in an async consumer's ``connect`` after ``accept()``. Returns the replay
        (``None`` when there was nothing to replay from: no ``after``, or a guard without
        a window, which is logged); a replay the window no longer
        covers calls :meth:`replay_gap` after sending what it has."""
        layer = self.channel_layer
        guard = emitguard.guarded(layer)
        if after is None:
            after = self.resume_after()
        if guard is None or after is None:
            await layer.group_add(group, self.channel_name)
            return None
        async with guard.hold(group):
            try:
                replay: Replay | None = await guard.areplay(group, after)
            except ValueError:  # no replay window: live only (a configuration to fix)
                log.warning(
                    "%s: join_group(%r) has nothing to replay from: guard_layer(..., "
                    "history=N) keeps a window",
                    self,
                    group,
                )
                replay = None
            await layer.group_add(group, self.channel_name)
            if replay is not None:
                for _seq, message in replay.messages:
                    await self.dispatch(message)
                if not replay.complete:
                    await self.replay_gap(group, replay)
        return replay

    async def replay_gap(self, group: str, replay: Replay) -> None:
        """The replay window no longer holds all the client missed of ``group``: by default
        the socket is closed with :attr:`resync_code`, so that the client reloads its state
        and reconnects without ``after``. Override it to send your own resync message."""
        log.info("%s: replay of %s incomplete (latest %d); closing", self, group, replay.latest)
        await self.close(code=self.resync_code)  # type: ignore[attr-defined]

    def _emitguard_gone(self) -> None:
        layer = getattr(self, "channel_layer", None)
        name = getattr(self, "channel_name", None)
        guard = emitguard.guarded(layer) if layer is not None else None
        if guard is None or name is None:
            return
        try:
            guard.disconnect_owner(name, f"consumer of {name} disconnected")
        except Exception:
            log.exception("emitguard could not record that %s disconnected", name)
