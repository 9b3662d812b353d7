"""``emitguard simulate``: the command, the in-memory simulation and its numbers."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import emitguard
from emitguard import cli
from emitguard.demo import (
    EVENTS,
    LEGACY_LOGGER,
    DemoConfig,
    DemoReport,
    ProgressBar,
    ScenarioResult,
    percentile,
    plan_runs,
    render_table,
    run_demo,
    run_scenarios,
    tally,
    verdict,
)

TIMINGS = ("wall_time", "barrier_wait_p50", "barrier_wait_p99")


def demo_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = cli.main(["simulate", "--no-progress", "--json", *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


def without_timings(result: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {k: v for k, v in part.items() if k not in TIMINGS}
        if isinstance(part, dict)
        else part
        for name, part in result.items()
    }


# -- the command ----------------------------------------------------------------------


def test_guarded_run_loses_nothing_where_the_bare_run_loses_events(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, result = demo_json(capsys, "--runs", "40", "--drop-rate", "0.25")

    assert code == 0
    bare, safe = result["unguarded"], result["guarded"]
    assert bare["emitted"] == safe["emitted"] == 40 * len(EVENTS)
    assert bare["lost"] > 0
    assert bare["delivered"] + bare["lost"] == bare["emitted"]
    assert bare["legacy_warnings"] == bare["lost"]
    assert safe["lost"] == 0
    assert safe["delivered"] == safe["emitted"]
    assert safe["out_of_order"] == 0
    assert safe["duplicates"] == 0
    assert safe["still_buffered"] == 0
    assert safe["drops"] == bare["drops"] > 0
    outcomes = safe["outcomes"]
    assert outcomes["delivered"] + outcomes["flushed"] == safe["emitted"]
    assert outcomes["buffered"] == outcomes["flushed"] > 0
    assert outcomes["dropped"] == outcomes["expired"] == outcomes["failed"] == 0
    assert safe["held"] == 40  # every agent_started waited for its association
    assert 0 < safe["barrier_wait_p50"] <= safe["barrier_wait_p99"]
    assert result["ok"] is True
    assert result["verdict"].startswith("PASS")


def test_same_seed_gives_the_same_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    _, first = demo_json(capsys, "--runs", "30", "--seed", "11")
    _, second = demo_json(capsys, "--runs", "30", "--seed", "11")
    _, other = demo_json(capsys, "--runs", "30", "--seed", "12")

    assert without_timings(first) == without_timings(second)
    assert without_timings(first) != without_timings(other)


def test_table_and_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["simulate", "--runs", "15", "--no-progress"])
    captured = capsys.readouterr()

    assert code == 0
    lines = captured.out.splitlines()
    assert lines[0].split() == ["metric", "unguarded", "guarded"]
    assert any(line.startswith("legacy 'Cannot deliver' warnings") for line in lines)
    lost = next(line for line in lines if line.startswith("events lost")).split()
    assert int(lost[-2]) > 0
    assert lost[-1] == "0"
    assert lines[-1].startswith("PASS: unguarded lost ")
    assert captured.err == ""  # --no-progress, and the legacy warnings are hidden


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--runs", "0"],
        ["simulate", "--runs", "many"],
        ["simulate", "--lag", "-1"],
        ["simulate", "--lag", "nan"],
        ["simulate", "--drop-rate", "1.5"],
        ["simulate", "--bogus"],
        ["nonsense"],
        [],
    ],
)
def test_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(args)
    assert excinfo.value.code == 2
    assert "usage: emitguard" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"emitguard {emitguard.__version__}"


def test_exit_code_1_when_the_guarded_run_loses_events(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = run_demo(DemoConfig(runs=5, pace=False))
    broken = DemoReport(
        real.config, real.unguarded, _with(real.guarded, delivered=24, lost=1, still_buffered=1)
    )
    monkeypatch.setattr(cli, "run_demo", lambda *args, **kwargs: broken)

    assert cli.main(["simulate", "--no-progress"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL: guarded lost 1/25")


def test_legacy_warnings_hidden_and_counted_unless_asked(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    _, hidden = demo_json(capsys, "--runs", "10")
    assert not [r for r in caplog.records if r.name == LEGACY_LOGGER]
    assert hidden["unguarded"]["legacy_warnings"] > 0

    _, shown = demo_json(capsys, "--runs", "10", "--legacy-logs")
    cannot = [
        r
        for r in caplog.records
        if r.name == LEGACY_LOGGER and r.getMessage().startswith("Cannot deliver")
    ]
    total = shown["unguarded"]["legacy_warnings"] + shown["guarded"]["legacy_warnings"]
    assert (
        len(cannot)
        == total
        == hidden["unguarded"]["legacy_warnings"] + (hidden["guarded"]["legacy_warnings"])
    )
    legacy = logging.getLogger(LEGACY_LOGGER)
    assert legacy.propagate is True
    assert legacy.handlers == []


@pytest.mark.slow
def test_console_script_end_to_end() -> None:
    script = Path(sys.executable).parent / "emitguard"
    proc = subprocess.run(
        [str(script), "simulate", "--runs", "20", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["metric", "unguarded", "guarded"]
    assert "events lost" in proc.stdout
    assert "legacy 'Cannot deliver' warnings" in proc.stdout
    assert "PASS: unguarded lost" in proc.stdout
    assert proc.stderr == ""


# -- the simulation, called directly -----------------------------------------------------


def test_run_demo_every_run_drops_and_still_nothing_is_lost() -> None:
    report = run_demo(DemoConfig(runs=40, seed=3, drop_rate=1.0, pace=False))

    bare, safe = report.unguarded, report.guarded
    assert bare.drops == safe.drops == 40
    assert bare.lost > 0
    assert safe.lost == safe.out_of_order == safe.duplicates == 0
    assert safe.still_buffered == 0
    assert safe.outcomes is not None
    assert safe.outcomes["flushed"] > 0
    assert safe.legacy_warnings > 0  # sends to silently dropped connections failed, then flushed
    assert report.ok


async def test_guarded_run_holds_on_a_real_event_loop() -> None:
    report = await run_scenarios(DemoConfig(runs=40, seed=5, lag=0.01, drop_rate=0.5))

    assert report.unguarded.lost > 0
    assert report.guarded.lost == 0
    assert report.guarded.out_of_order == 0
    assert report.guarded.still_buffered == 0


def test_plans_are_drawn_up_front_from_the_seed() -> None:
    config = DemoConfig(runs=50, seed=9, lag=0.02, drop_rate=0.3)
    plans = plan_runs(config)

    assert plans == plan_runs(config)
    assert plans != plan_runs(DemoConfig(runs=50, seed=10, lag=0.02, drop_rate=0.3))
    assert [p.thread_id for p in plans[:2]] == ["thread-0", "thread-1"]
    assert all(0 <= p.associate_after <= 0.02 for p in plans)
    assert all(len(p.gaps) == len(EVENTS) - 1 for p in plans)
    dropped = [p for p in plans if p.drop is not None]
    assert 0 < len(dropped) < 50
    assert all(1 <= p.drop.after_event < len(EVENTS) for p in dropped if p.drop)
    # the drop rate picks which runs drop; the other draws do not move
    no_drops = plan_runs(DemoConfig(runs=50, seed=9, lag=0.02, drop_rate=0.0))
    assert [p.associate_after for p in no_drops] == [p.associate_after for p in plans]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="runs"):
        DemoConfig(runs=0)
    with pytest.raises(ValueError, match="lag"):
        DemoConfig(lag=-0.1)
    with pytest.raises(ValueError, match="drop_rate"):
        DemoConfig(drop_rate=1.1)
    assert DemoConfig(lag=0.2).barrier_timeout == pytest.approx(1.2)


# -- the arithmetic and the output -------------------------------------------------------


def test_tally_counts_unique_late_and_duplicate_deliveries() -> None:
    got = tally(
        {
            "t1": [
                {"seq": 1, "n": 1},
                {"seq": 3, "n": 3},
                {"seq": 2, "n": 2},  # arrived after a later event
                {"seq": 3, "n": 3},  # second copy
            ],
            "t2": [{"seq": 1, "n": 1}],
        },
        "seq",
    )
    assert (got.delivered, got.out_of_order, got.duplicates) == (4, 1, 1)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_failed_report_reads_as_a_failure() -> None:
    real = run_demo(DemoConfig(runs=4, pace=False))
    reordered = DemoReport(real.config, real.unguarded, _with(real.guarded, out_of_order=2))

    assert real.ok
    assert not reordered.ok
    assert verdict(reordered).startswith("FAIL: guarded lost 0/20 events, 2 out of order")
    row = next(r for r in render_table(reordered).splitlines() if r.startswith("events out"))
    assert row.split()[-1] == "2"


def test_progress_bar_draws_one_line_per_phase() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, width=10)
    for done in range(5):
        bar("guarded", done, 4)
    bar("guarded", 4, 4)  # repeated: not redrawn

    assert stream.getvalue().count("\r") == 5
    assert stream.getvalue().endswith("\rguarded   [##########] 4/4\n")
    assert "\rguarded   [#####-----] 2/4" in stream.getvalue()

    silent = io.StringIO()
    ProgressBar(silent, enabled=False)("guarded", 1, 2)
    assert silent.getvalue() == ""


def _with(result: ScenarioResult, **changes: Any) -> ScenarioResult:
    return dataclasses.replace(result, **changes)


def test_terminal_outcomes_add_up_to_the_events_emitted_and_buffered_is_a_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["simulate", "--runs", "40", "--drop-rate", "0.25", "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0

    def value(label: str) -> int:
        row = next(line for line in lines if line.startswith(label))
        return int(row.split()[-1])

    terminal = [line for line in lines if line.startswith("guard outcome: ")]
    assert [line.split()[2] for line in terminal] == [
        "delivered", "flushed", "dropped", "expired", "failed", "rejected", "passed"
    ]  # fmt: skip
    assert not any("buffered" in line for line in terminal)
    total = sum(int(line.split()[-1]) for line in terminal) + value("still buffered")
    assert total == value("  total (= events emitted)") == value("events emitted") == 200
    assert value("path: waited in the buffer") == value("guard outcome: flushed") > 0
    assert value("path: held at the barrier") == 40
    assert any(line.startswith("Outcomes: one terminal outcome per event") for line in lines)
    assert any("virtual clock" in line for line in lines)
    assert not any(line.startswith("latency covers") for line in lines)  # no sockets here


def test_json_names_the_setup_the_clock_and_what_varies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, result = demo_json(capsys, "--runs", "5")
    assert result["setup"] == "guard"
    assert result["clock"] == "virtual"
    assert any("vary" in note for note in result["notes"])
