"""pytest plugin entry point (``pytest11``): fixtures, marker and options for emitguard.

Installed next to any project, the plugin stays out of its way until that project opts in:
its fixtures (all named ``emitguard_*``) act where a test requests them, the marker where a
test carries it, and the log watch (``emitguard_fail_on_log``) and strict mode
(``emitguard_strict`` / ``--emitguard-strict``) only where the project's configuration turns
them on. Both are off by default.

Everything heavy is imported inside the hooks and fixtures, so coverage sees this package.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from emitguard import Guard, Outcome
    from emitguard.testing import ReferenceManager
    from pytest_emitguard._ledger import EmissionLedger

LEGACY_FAIL_ON_LOG = ("Cannot deliver message for thread", "EMISSION FAILED")
"""Patterns for the legacy manager's lost-event warnings, suggested in the docs for
``emitguard_fail_on_log``; the option's default is empty (the watch is off)."""

LEDGER = "emitguard_emissions"
"""The ledger fixture's name; strict mode and the marker add it to a test."""

MARKER = (
    "emitguard(*, allow=(), drain_timeout=2.0, strict=None): check the emissions of this test "
    "at teardown; allow: outcomes that may end an emission (e.g. 'dropped'); drain_timeout: "
    "seconds to deliver what is still buffered; strict: also check without the fixture"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("emitguard", "emitguard: fail tests that lose WebSocket events")
    group.addoption(
        "--emitguard-strict",
        action="store_true",
        default=None,
        help="check every test's emissions at teardown, with or without the fixture",
    )
    parser.addini(
        "emitguard_strict",
        type="bool",
        default=False,
        help="check every test's emissions at teardown (like --emitguard-strict)",
    )
    group.addoption(
        "--emitguard-report",
        dest="emitguard_report",
        metavar="PATH",
        default=None,
        help="write every emission record of the session, per test, to PATH: JSON, or an HTML "
        "page of per-thread timelines when PATH ends in .html",
    )
    parser.addini(
        "emitguard_fail_on_log",
        type="linelist",
        default=[],
        help="regular expressions; a WARNING-or-worse log record matching one fails the test "
        "(default empty: the watch is off)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    import emitguard.hooks
    from pytest_emitguard import _faults, _watch

    # Import the engine and its adapters now, once: an in-process pytester run restores
    # sys.modules afterwards and would otherwise leave two copies of them in play.
    emitguard.hooks.load_entry_points()

    for part in (_faults, _watch):
        config.pluginmanager.register(part, part.__name__)


class MarkerOptions:
    """The ``@pytest.mark.emitguard(...)`` options, validated."""

    def __init__(
        self,
        *,
        allow: tuple[str | Outcome, ...] | list[str | Outcome] | str = (),
        drain_timeout: float = 2.0,
        strict: bool | None = None,
    ) -> None:
        from pytest_emitguard._ledger import BAD_OUTCOMES, _outcome

        items = (allow,) if isinstance(allow, str) else tuple(allow)
        self.allow = frozenset(_outcome(item) for item in items)
        not_bad = sorted(o.value for o in self.allow - BAD_OUTCOMES)
        if not_bad:
            raise ValueError(f"allow takes bad outcomes only, got {', '.join(not_bad)}")
        if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, (int, float)):
            raise TypeError(f"drain_timeout must be a number of seconds, got {drain_timeout!r}")
        if drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {drain_timeout!r}")
        self.drain_timeout = float(drain_timeout)
        self.strict = strict

    @classmethod
    def of(cls, item: pytest.Item) -> MarkerOptions:
        marker = item.get_closest_marker("emitguard")
        if marker is None:
            return cls()
        if marker.args:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.emitguard takes keyword options only, "
                f"got {marker.args!r}"
            )
        unknown = sorted(set(marker.kwargs) - {"allow", "drain_timeout", "strict"})
        if unknown:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.emitguard: unknown option(s) "
                f"{', '.join(map(repr, unknown))}; options: allow, drain_timeout, strict"
            )
        try:
            return cls(**marker.kwargs)
        except (TypeError, ValueError) as exc:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.emitguard: {exc}") from None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Strict mode and the marker give a test the ledger check without the fixture.

    The ledger goes first among the test's fixtures, so that it also sees what the other
    fixtures emit. Tests of a project that neither sets strict mode nor uses the marker are
    left exactly as they are (no autouse fixture).
    """
    if not isinstance(item, pytest.Function) or LEDGER in item.fixturenames:
        return
    marker = item.get_closest_marker("emitguard")
    strict = marker.kwargs.get("strict") if marker is not None else None
    if strict is None:
        strict = marker is not None or _strict(item.config)
    if strict:
        # A new list: parametrized tests share the one they were collected with.
        item.fixturenames = [LEDGER, *item.fixturenames]


def _strict(config: pytest.Config) -> bool:
    flag = config.getoption("emitguard_strict")
    return bool(flag) if flag is not None else bool(config.getini("emitguard_strict"))


def _drain_guards(guards: Iterable[Guard], timeout: float) -> None:
    """Deliver what the test's guards can still deliver, within ``timeout`` seconds."""
    for guard in guards:
        stats = guard.stats()
        if not stats.pending_total and not stats.in_flight:
            continue
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(guard.drain(timeout))


@pytest.fixture
def emitguard_emissions(request: pytest.FixtureRequest) -> Iterator[EmissionLedger]:
    """The ledger of every emission recorded by any guard during the test.

    At teardown it drains the guards (bounded by the marker's ``drain_timeout``) and fails the
    test if an emission ended DROPPED, EXPIRED, FAILED or REJECTED, or is still BUFFERED,
    unless the marker's ``allow`` lists that outcome.
    """
    import emitguard
    from pytest_emitguard._ledger import EmissionLedger, summary

    options = MarkerOptions.of(request.node)
    ledger = EmissionLedger()
    emitguard.register(ledger)
    try:
        yield ledger
        _drain_guards(ledger.guards(), options.drain_timeout)
    finally:
        emitguard.unregister(ledger)
    bad = ledger.problems(options.allow)
    if bad:
        kinds = tuple(sorted({r.outcome.value for r in bad}))
        pytest.fail(
            summary(
                bad, "did not reach their thread" if len(bad) > 1 else "did not reach its thread"
            )
            + f"\n\nIf this is expected, allow it: @pytest.mark.emitguard(allow={kinds!r})",
            pytrace=False,
        )


@pytest.fixture
def emitguard_guard() -> Iterator[Callable[..., Guard]]:
    """``emitguard_guard(target, **options) -> Guard``; every target is unguarded at teardown,
    even when the test fails."""
    import emitguard

    targets: list[Any] = []

    def guard(target: Any, **options: Any) -> Guard:
        result = emitguard.guard(target, **options)
        targets.append(target)
        return result

    try:
        yield guard
    finally:
        for target in reversed(targets):
            emitguard.unguard(target)


@pytest.fixture
def emitguard_manager() -> ReferenceManager:
    """A fresh :class:`emitguard.testing.ReferenceManager` (unguarded)."""
    from emitguard.testing import ReferenceManager

    return ReferenceManager()
