"""A channel layer guarded with its capacity drops made visible (``transport.dropped``).

Both layers drop a message for a channel that already holds ``capacity`` messages and tell
the caller nothing: the in-memory layer's ``send`` raises ``ChannelFull``, which its
``group_send`` swallows; channels_redis's ``group_send`` runs a Lua script that skips full
channels and only logs, at INFO, ``"<n> of <m> channels over capacity in group <g>"``. Around
a guarded ``group_send`` (while the guard confirms deliveries) each such drop is reported to
the guard with :func:`emitguard.transport.dropped`, so the event is retried and kept instead
of being counted delivered.

This is a built-in ``emitguard_adapt`` plugin (entry point ``channels`` of the ``emitguard``
group) that runs before the manager adapter. For a channel layer instance guarded with
``send="group_send"`` it lets the manager adapter wrap the layer's methods and adds the watch;
``emitguard.unguard(layer)`` takes both off. Anything else it leaves to the next plugin.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from emitguard import hookimpl, transport
from emitguard_adapters.manager import ManagerAdapter

__all__ = ["CAPACITY", "TAG", "RedisCapacityFilter", "emitguard_adapt"]

REDIS_LOGGER = "channels_redis.core"
TAG = "_emitguard_tag"
"""The key under which a guarded ``group_send``'s message carries its confirmation tag."""
_TAGGING = "_emitguard_tagging"
CAPACITY = "dropped by the channel layer for capacity"
"""The start of the reason recorded for a capacity drop."""


class RedisCapacityFilter(logging.Filter):
    """On channels_redis's logger: its record of channels over capacity, logged inside the
    ``group_send`` call, becomes a drop of the send running there. The logger is set to
    INFO so that the record is made; records below the level the host had configured are
    not passed on to its handlers, so the host's logs do not change."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.own_level = logger.level
        """The logger's level before (NOTSET: it followed its parents)."""

    def host_level(self) -> int:
        if self.own_level:
            return self.own_level
        parent = self.logger.parent
        return parent.getEffectiveLevel() if parent is not None else logging.WARNING

    def filter(self, record: logging.LogRecord) -> bool:
        if "over capacity" in str(record.msg):
            transport.dropped(f"{CAPACITY}: {record.getMessage()}")
        return record.levelno >= self.host_level()


def watch_redis() -> None:
    """Install the filter on channels_redis's logger (once per process; it stays: it changes
    nothing for the host, and does nothing outside a guarded send)."""
    logger = logging.getLogger(REDIS_LOGGER)
    if any(isinstance(known, RedisCapacityFilter) for known in logger.filters):
        return
    watch = RedisCapacityFilter(logger)
    logger.addFilter(watch)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


class _FullWatch:
    """The in-memory layer's ``send`` on one instance: a ``ChannelFull`` is a drop."""

    def __init__(self, send: Callable[..., Awaitable[Any]]) -> None:
        self.send = send

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from channels.exceptions import ChannelFull  # type: ignore[import-untyped]

        try:
            return await self.send(*args, **kwargs)
        except ChannelFull as exc:
            channel = args[0] if args else kwargs.get("channel")
            transport.dropped(f"{CAPACITY}: channel {channel} is full ({exc!r})")
            raise


def _tagging(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """The layer's ``group_send`` on one instance, under the guard: while the guard confirms
    the send, the message carries the send's :func:`emitguard.transport.tag` under
    :data:`TAG` to the group's consumers, where :class:`GuardedConsumerMixin` takes it out
    before any handler sees the message."""

    async def group_send(group: Any, message: Any) -> Any:
        mark = transport.tag()
        if mark is not None and isinstance(message, dict):
            message = {**message, TAG: mark}
        return await original(group, message)

    setattr(group_send, _TAGGING, True)
    return group_send


class _Layer:
    """The manager adapter's patches, plus the capacity watch and the tagging."""

    def __init__(self, adapted: Any, layer: Any, watched: bool, tagged: bool) -> None:
        self.adapted = adapted
        self.guard = adapted.guard
        self.layer = layer
        self.watched = watched
        self.tagged = tagged

    def unguard(self) -> None:
        self.adapted.unguard()
        if self.watched and isinstance(vars(self.layer).get("send"), _FullWatch):
            del self.layer.send
        if self.tagged and getattr(vars(self.layer).get("group_send"), _TAGGING, False):
            del self.layer.group_send


def _kind(target: Any) -> str | None:
    """``"memory"``, ``"redis"`` or ``None`` (not a layer this module knows)."""
    for cls in type(target).__mro__:
        where = f"{cls.__module__}.{cls.__qualname__}"
        if where == "channels.layers.InMemoryChannelLayer":
            return "memory"
        if where.startswith("channels_redis."):
            return "redis"
    return None


@hookimpl(tryfirst=True)
def emitguard_adapt(target: Any, options: dict[str, Any]) -> Any:
    """A channel layer instance guarded with ``send="group_send"``: the manager adapter,
    plus its capacity watch."""
    if isinstance(target, (str, type)) or options.get("send") != "group_send":
        return None
    if "channels.layers" not in sys.modules:
        return None
    kind = _kind(target)
    if kind is None:
        return None
    tagged = not getattr(vars(target).get("group_send"), _TAGGING, False)
    if tagged:
        target.group_send = _tagging(target.group_send)
    try:
        adapted = ManagerAdapter.create(target, options)
    except BaseException:
        if tagged:
            del target.group_send
        raise
    watched = False
    if kind == "redis":
        watch_redis()
    elif not isinstance(vars(target).get("send"), _FullWatch):
        target.send = _FullWatch(target.send)
        watched = True
    return _Layer(adapted, target, watched, tagged)
