"""The guard's OpenTelemetry instruments, shared by every guard that reports to one meter.

A meter hands out an instrument once per name, so the instruments live here, one set per
meter, and the observable ones report every guard of that set. Outcome counts are plain dict
increments in the guard (read when the metric reader collects), because a synchronous counter
costs microseconds per emission.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

from emitguard.states import Outcome


class Member(Protocol):
    """What the instruments read of each guard's telemetry."""

    guard_name: str
    counts: dict[tuple[Outcome, str | None], int]

    def outbox_size(self) -> int: ...

_PROXY: tuple[type, ...]
try:  # the global placeholder until an SDK is installed; no public name exists for it
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    _PROXY = (_ProxyMeterProvider,)
except ImportError:  # pragma: no cover - a future API that moved it: treat it as real
    _PROXY = ()

__all__ = ["EMISSIONS", "Instruments", "meter_of"]

EMISSIONS = "emitguard.emissions"
BARRIER_WAIT = "emitguard.barrier.wait"
BUFFER_DURATION = "emitguard.buffer.duration"
OUTBOX_SIZE = "emitguard.outbox.size"

GUARD = "emitguard.guard"
OUTCOME = "emitguard.outcome"
EVENT_TYPE = "emitguard.event_type"

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
"""Bucket boundaries for waits from a millisecond to the default TTL of five minutes."""

_sets: weakref.WeakKeyDictionary[Meter, Instruments] = weakref.WeakKeyDictionary()


def meter_of(provider: MeterProvider | None, version: str) -> Meter | None:
    """emitguard's meter from ``provider`` (the global one when ``None``), or ``None`` when
    no SDK stands behind it, so that nothing is counted."""
    if provider is None or isinstance(provider, _PROXY):
        provider = metrics.get_meter_provider()
    if isinstance(provider, (*_PROXY, metrics.NoOpMeterProvider)):
        return None
    meter = provider.get_meter("emitguard", version)
    return None if isinstance(meter, metrics.NoOpMeter) else meter


class Instruments:
    """The instruments of one meter and the guards they report."""

    def __init__(self, meter: Meter) -> None:
        self.members: weakref.WeakSet[Member] = weakref.WeakSet()
        self.barrier_wait = meter.create_histogram(
            BARRIER_WAIT,
            unit="s",
            description="Seconds an emission waited on the readiness barrier for its thread",
            explicit_bucket_boundaries_advisory=SECONDS,
        )
        self.buffer_duration = meter.create_histogram(
            BUFFER_DURATION,
            unit="s",
            description="Seconds an emission spent in the outbox before it left it",
            explicit_bucket_boundaries_advisory=SECONDS,
        )
        meter.create_observable_counter(
            EMISSIONS,
            callbacks=[self._emissions],
            unit="{emission}",
            description="Emission records by outcome and event type",
        )
        meter.create_observable_up_down_counter(
            OUTBOX_SIZE,
            callbacks=[self._outbox_sizes],
            unit="{emission}",
            description="Emissions waiting in the outbox",
        )

    @classmethod
    def of(cls, meter: Meter) -> Instruments:
        """The instruments of ``meter``, created on first use."""
        found = _sets.get(meter)
        if found is None:
            found = _sets[meter] = cls(meter)
        return found

    def _emissions(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[str, Outcome, str | None], int] = {}
        # Guards of one name (one manager class) add up; a closed guard still counts, or the
        # cumulative counter would go down (only a guard that was garbage-collected drops out).
        for member in list(self.members):
            for (outcome, event_type), count in dict(member.counts).items():
                key = (member.guard_name, outcome, event_type)
                totals[key] = totals.get(key, 0) + count
        for (guard, outcome, event_type), count in totals.items():
            attributes = {GUARD: guard, OUTCOME: outcome.value}
            if event_type is not None:
                attributes[EVENT_TYPE] = event_type
            yield Observation(count, attributes)

    def _outbox_sizes(self, options: CallbackOptions) -> Iterable[Observation]:
        sizes: dict[str, int] = {}
        for member in list(self.members):
            sizes[member.guard_name] = sizes.get(member.guard_name, 0) + member.outbox_size()
        for guard, size in sizes.items():
            yield Observation(size, {GUARD: guard})
