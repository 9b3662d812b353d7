"""Configuration errors raise at construction, quoting the offending value."""

from __future__ import annotations

from typing import Any

import pytest

from emitguard import Guard, GuardOptions


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"ready_timeout": -1}, ValueError, "ready_timeout must be >= 0 seconds, got -1"),
        ({"ready_timeout": float("nan")}, ValueError, "ready_timeout"),
        ({"ready_timeout": "2"}, TypeError, "ready_timeout must be a number of seconds, got '2'"),
        ({"ready_timeout": True}, TypeError, "got True"),
        ({"ttl": 0}, ValueError, "ttl must be > 0 seconds, got 0"),
        (
            {"on_unready": "sleep"},
            ValueError,
            "on_unready must be one of wait, buffer; got 'sleep'",
        ),
        ({"overflow": "drop_all"}, ValueError, "overflow must be one of drop_oldest"),
        ({"max_per_thread": 0}, ValueError, "max_per_thread must be >= 1, got 0"),
        ({"max_total": 1.5}, TypeError, "max_total must be an int, got 1.5"),
        ({"protect": "agent_completed"}, TypeError, "protect must be a collection"),
        ({"protect": ["ok", ""]}, ValueError, "protect holds event types"),
        (
            {"stamp_seq": ""},
            ValueError,
            "stamp_seq must be a non-empty key, a callable(message, seq) or None, got ''",
        ),
        ({"strict": "yes"}, TypeError, "strict must be a bool, got 'yes'"),
        ({"redy_timeout": 1}, TypeError, "unknown guard option(s) 'redy_timeout'; valid options:"),
    ],
)
def test_bad_options(options: dict[str, Any], error: type[Exception], text: str) -> None:
    with pytest.raises(error) as caught:
        Guard(**options)
    assert text in str(caught.value)


def test_defaults_and_round_trip() -> None:
    options = GuardOptions()
    assert options.ready_timeout == 2.0
    assert options.on_unready == "wait"
    assert options.overflow == "drop_oldest"
    assert options.ttl == 300.0
    assert GuardOptions.from_kwargs(options.as_dict()) == options
    assert GuardOptions(protect=["a", "b"]).protect == frozenset({"a", "b"})  # type: ignore[arg-type]
    assert GuardOptions(ttl=None).ttl is None
