"""Outbox backends by URL: ``memory://`` (the default, in process) or ``redis://``.

The Redis backend is imported only when a URL names it (it needs the ``redis`` extra).
"""

from __future__ import annotations

from emitguard.outbox import MemoryOutbox, Outbox

__all__ = ["from_url"]


def from_url(url: str) -> Outbox:
    """The backend a URL names: ``memory://`` or ``redis://`` (``rediss://``, ``unix://``)."""
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryOutbox()
    if scheme in ("redis", "rediss", "unix"):
        from emitguard import redis_outbox

        return redis_outbox.from_url(url)
    raise ValueError(f"no outbox backend for {url!r}: use memory:// or redis://")
