"""Validated configuration of a :class:`~emitguard.Guard`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

__all__ = ["OVERFLOW_POLICIES", "UNREADY_POLICIES", "VERDICTS", "GuardOptions", "stamped"]

OverflowPolicy = Literal["drop_oldest", "drop_newest", "reject"]
UnreadyPolicy = Literal["wait", "buffer"]

OVERFLOW_POLICIES: tuple[str, ...] = ("drop_oldest", "drop_newest", "reject")
UNREADY_POLICIES: tuple[str, ...] = ("wait", "buffer")
VERDICTS: tuple[str, ...] = ("none_is_failure",)
"""Named values of the ``verdict`` option."""


@dataclasses.dataclass(frozen=True)
class GuardOptions:
    """Every knob of the engine, checked once at construction.

    Bad values raise :class:`ValueError` (or :class:`TypeError` for a wrong type) that quotes
    the offending value.
    """

    ready_timeout: float = 2.0
    """Seconds a send to a never-associated thread waits on the readiness barrier."""
    on_unready: UnreadyPolicy = "wait"
    """``"wait"`` on the barrier (then buffer), or ``"buffer"`` at once."""
    max_per_thread: int = 1000
    """Outbox bound per thread."""
    max_total: int = 100_000
    """Outbox bound over all threads."""
    ttl: float | None = 300.0
    """Seconds an event may wait in the outbox before it expires; ``None``: never."""
    overflow: OverflowPolicy = "drop_oldest"
    """What a full outbox does with a new event."""
    protect: frozenset[str] = frozenset()
    """Event types never evicted by ``drop_oldest``/``drop_newest``."""
    stamp_seq: str | Callable[[Any, int], Any] | None = None
    """Key under which ``seq`` is stamped into dict messages (a copy); or a callable
    ``stamp(message, seq) -> message`` that returns the message to send (adapters whose
    messages are not dicts); ``None``: no stamp."""
    strict: bool = False
    """Raise :class:`~emitguard.EmissionError` instead of returning falsy."""
    poison: tuple[type[BaseException], ...] = (TypeError, ValueError)
    """Exceptions from the original send that mean the message itself cannot be sent (it does
    not serialise, the call is wrong): such an event is FAILED at once instead of being kept
    and retried, and the thread keeps its state."""
    verdict: Callable[[Any], bool] | str | None = None
    """What the original send's result means when it did not raise: ``None`` (the default)
    takes a truthy value or ``None`` as delivered; ``"none_is_failure"`` takes only a truthy
    value (for a send that swallows a closed socket and returns ``None``); a callable
    ``verdict(result) -> bool`` decides itself (its exceptions are logged, and the result is
    then taken as delivered)."""
    event_type: Callable[[Any], str | None] | None = None
    """``event_type(message)``: the event type of a message, for records, spans and
    ``protect``; ``None`` reads a mapping's ``"type"`` key or a ``type`` attribute. Its
    exceptions are logged and the type is then unknown."""
    history: int = 0
    """Delivered messages kept per thread for :meth:`~emitguard.Guard.replay` (a client that
    reconnects gets what it missed); 0 keeps none."""
    history_total: int = 100_000
    """Delivered messages kept over all threads together (with ``history``): past it, the
    thread written to least recently loses its oldest messages first."""
    retry_backoff: tuple[float, ...] = (0.01, 0.05, 0.25)
    """Seconds to wait before each retry of a failed delivery while the thread is associated;
    when they are used up the thread counts as disconnected. ``()``: disconnected at once."""
    idle_threads: int = 1000
    """Idle threads (no association, nothing buffered, nobody waiting) whose state is kept;
    past it, the longest idle are forgotten (a thread met again starts as CONNECTING)."""
    tracing: bool = True
    """Emit OpenTelemetry spans when a tracer provider with an SDK is configured."""
    metrics: bool = True
    """Report OpenTelemetry metrics when a meter provider with an SDK is configured."""
    destination_template: str = "threads/{thread_id}"
    """``messaging.destination.template`` of spans, and the second word of their names."""
    span_hook: Callable[..., None] | None = None
    """``span_hook(span, thread_id, message)``, called on each recording send span; add
    attributes there. It runs before the original send when the span is held open around it,
    and just before the span ends for a straight delivery (whose span is made after the call).
    Its exceptions are logged and the emission goes on."""

    def __post_init__(self) -> None:
        _number("ready_timeout", self.ready_timeout, allow_zero=True)
        _choice("on_unready", self.on_unready, UNREADY_POLICIES)
        _count("max_per_thread", self.max_per_thread)
        _count("max_total", self.max_total)
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 0:
            raise ValueError(f"history must be an int >= 0, got {self.history!r}")
        _count("history_total", self.history_total)
        if isinstance(self.idle_threads, bool) or not isinstance(self.idle_threads, int):
            raise TypeError(f"idle_threads must be an int, got {self.idle_threads!r}")
        if self.idle_threads < 0:
            raise ValueError(f"idle_threads must be >= 0, got {self.idle_threads!r}")
        object.__setattr__(self, "retry_backoff", _delays(self.retry_backoff))
        if self.ttl is not None:
            _number("ttl", self.ttl, allow_zero=False)
        _choice("overflow", self.overflow, OVERFLOW_POLICIES)
        object.__setattr__(self, "protect", _event_types(self.protect))
        if (
            self.stamp_seq is not None
            and not callable(self.stamp_seq)
            and (not isinstance(self.stamp_seq, str) or not self.stamp_seq)
        ):
            raise ValueError(
                f"stamp_seq must be a non-empty key, a callable(message, seq) or None, "
                f"got {self.stamp_seq!r}"
            )
        object.__setattr__(self, "poison", _exception_types(self.poison))
        for flag in ("strict", "tracing", "metrics"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if not isinstance(self.destination_template, str) or not self.destination_template:
            raise ValueError(
                f"destination_template must be a non-empty str, got {self.destination_template!r}"
            )
        if not (self.verdict is None or callable(self.verdict) or self.verdict in VERDICTS):
            raise ValueError(
                f"verdict must be None, 'none_is_failure' or a callable(result) -> bool; "
                f"got {self.verdict!r}"
            )
        if self.event_type is not None and not callable(self.event_type):
            raise TypeError(
                f"event_type must be a callable(message) -> str or None, got {self.event_type!r}"
            )
        if self.span_hook is not None and not callable(self.span_hook):
            raise TypeError(f"span_hook must be callable or None, got {self.span_hook!r}")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> GuardOptions:
        """Build from keyword options, naming any unknown one and the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(
                f"unknown guard option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(valid))}"
            )
        return cls(**options)

    def as_dict(self) -> dict[str, Any]:
        """The options as keyword arguments."""
        return dataclasses.asdict(self)


def stamped(
    stamp: str | Callable[[Any, int], Any] | None, message: Any, seq: int, epoch: str | None = None
) -> Any:
    """``message`` with its seq stamped in as option ``stamp_seq`` says: a copy of a dict with
    ``seq`` under the key (and, from a shared log, ``epoch`` under ``"epoch"``), or what the
    callable returns; anything else as it is."""
    if isinstance(stamp, str):
        if not isinstance(message, dict):
            return message
        return {**message, stamp: seq} if epoch is None else {**message, stamp: seq, "epoch": epoch}
    if stamp is not None:
        return stamp(message, seq)
    return message


def _number(name: str, value: object, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")


def _delays(value: object) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"retry_backoff must be a sequence of seconds, got {value!r}")
    delays = tuple(cast("Iterable[object]", value))
    for delay in delays:
        _number("retry_backoff", delay, allow_zero=True)
    return cast("tuple[float, ...]", delays)


def _count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _exception_types(value: object) -> tuple[type[BaseException], ...]:
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, (tuple, list, set, frozenset)) or not all(
        isinstance(item, type) and issubclass(item, BaseException) for item in items
    ):
        raise TypeError(f"poison must be exception classes, got {value!r}")
    return tuple(items)


def _event_types(value: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"protect must be a collection of event types, got {value!r}")
    items = frozenset(cast("Iterable[object]", value))
    bad = [item for item in items if not isinstance(item, str) or not item]
    if bad:
        raise ValueError(f"protect holds event types that are not non-empty str: {bad!r}")
    return cast("frozenset[str]", items)
