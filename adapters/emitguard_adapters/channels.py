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
and sent again after the group's next ``group_add``.
"""

from __future__ import annotations

import logging
from typing import Any

import emitguard
from emitguard import AdapterError, Guard, transport

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
    sends is confirmed to the guard of its channel layer, and the consumer ending (its socket
    closed, its ``disconnect`` handler run) is its channel, the owner, going away."""

    channel_name: str
    channel_layer: Any

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        # (wrapped at the ASGI call, which both kinds of consumer share: a sync consumer's
        # handlers run in a worker thread, its frames still leave through this ``send``)
        async def confirmed_send(message: Any) -> None:
            await send(message)
            if message.get("type") == "websocket.send":
                name = getattr(self, "channel_name", None)
                if name is not None:
                    transport.frame_sent(name)

        try:
            return await super().__call__(scope, receive, confirmed_send)  # type: ignore[misc]
        finally:
            self._emitguard_gone()

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
