"""``emitguard demo``: the report's race over real sockets (uvicorn + websockets clients)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from emitguard import cli
from emitguard.demo import DemoConfig, DemoReport, DropPlan, RunPlan, plan_runs
from emitguard_adapters import socket_demo
from emitguard_adapters._demo_script import Timeline


def demo_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = cli.main(["demo", "--no-progress", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_unguarded_loses_events_and_guarded_loses_none(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = demo_json(capsys, "--runs", "40", "--drop-rate", "0.5", "--seed", "3")
    bare, safe = report["unguarded"], report["guarded"]
    assert code == 0
    assert report["ok"] is True
    assert bare["emitted"] == safe["emitted"] == 200
    assert bare["drops"] == safe["drops"] > 0
    assert bare["lost"] > 0
    assert bare["legacy_warnings"] > 0
    assert (safe["lost"], safe["out_of_order"], safe["repeated"]) == (0, 0, 0)
    assert safe["still_buffered"] == 0
    assert safe["outcomes"]["flushed"] == safe["outcomes"]["buffered"] > 0
    assert safe["held"] > 0
    assert safe["latency_p50"] is not None
    assert safe["latency_p99"] >= safe["latency_p50"]
    assert safe["events_per_s"] > 0


def test_the_table_shows_latency_and_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--runs", "10", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "unguarded", "guarded"]
    for row in ("delivery latency p50 (ms)", "delivery latency p99 (ms)"):
        assert any(line.startswith(row) for line in lines)
    assert any(line.startswith("events delivered per second") for line in lines)
    assert lines[-1].startswith("PASS: unguarded lost")


def test_latency_rows_say_what_they_cover_and_the_notes_what_varies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, report = demo_json(capsys, "--runs", "20", "--seed", "3")
    assert code == 0
    bare, safe = report["unguarded"], report["guarded"]
    assert report["clock"] == "network"
    assert report["setup"] == "resume"
    notes = " ".join(report["notes"])
    assert f"unguarded {bare['delivered']} of {bare['emitted']}" in notes
    assert "vary" in notes
    outcomes = safe["outcomes"]
    terminal = sum(count for name, count in outcomes.items() if name != "buffered")
    assert terminal + safe["still_buffered"] == safe["emitted"]

    assert cli.main(["demo", "--runs", "20", "--seed", "3", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    covers = next(line for line in lines if line.startswith("latency covers")).split()
    assert covers[-2].endswith("/100")  # the unguarded run's arrivals
    assert covers[-1] == "100/100"


@pytest.mark.parametrize("setup", ["guard", "middleware"])
def test_the_other_setups_run_and_say_which_they_are(
    setup: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = demo_json(capsys, "--runs", "20", "--drop-rate", "0", "--setup", setup)
    assert report["setup"] == setup
    assert code == 0  # without drops every setup delivers everything
    assert report["guarded"]["lost"] == 0


def test_an_unknown_setup_is_refused() -> None:
    with pytest.raises(ValueError, match="setup must be one of"):
        socket_demo.run_socket_demo(DemoConfig(runs=1), setup="everything")


def test_exit_code_1_when_the_guarded_run_repeats_an_event(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = socket_demo.run_socket_demo(DemoConfig(runs=4, drop_rate=0.0))
    broken = DemoReport(real.config, real.unguarded, dataclasses.replace(real.guarded, repeated=1))
    monkeypatch.setattr(socket_demo, "run_socket_demo", lambda *args, **kwargs: broken)
    assert cli.main(["demo", "--no-progress"]) == 1
    assert "1 repeated" in capsys.readouterr().out.splitlines()[-1]


def test_without_the_socket_libraries_the_demo_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "emitguard_adapters.socket_demo", None)
    assert cli.main(["demo", "--no-progress"]) == 2
    assert "pip install 'emitguard[demo]'" in capsys.readouterr().err


def test_console_script_runs_the_socket_demo_by_default() -> None:
    script = Path(sys.executable).parent / "emitguard"
    proc = subprocess.run(
        [str(script), "demo", "--runs", "30", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "delivery latency p99 (ms)" in proc.stdout
    assert "PASS: unguarded lost" in proc.stdout


# -- seeded scenarios: the same from run to run ---------------------------------------------


def _seed_fixed(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the fields it says vary with timing and the network."""
    fixed = {key: value for key, value in report.items() if key not in ("unguarded", "guarded")}
    for side in ("unguarded", "guarded"):
        varies = set(report["varies"][side])
        fixed[side] = {key: value for key, value in report[side].items() if key not in varies}
    return fixed


def test_same_seed_same_scenario_and_same_seed_fixed_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ("--runs", "60", "--drop-rate", "0.5")
    _, first = demo_json(capsys, *args, "--seed", "3")
    _, second = demo_json(capsys, *args, "--seed", "3")
    _, other = demo_json(capsys, *args, "--seed", "4")

    assert first["clock"] == "network"
    assert "latency_p50" in first["varies"]["guarded"]
    assert "lost" not in first["varies"]["unguarded"]
    assert _seed_fixed(first) == _seed_fixed(second)
    assert first["scenario"] == second["scenario"] != other["scenario"]
    assert _seed_fixed(first)["unguarded"] != _seed_fixed(other)["unguarded"]
    # what the bare app loses is what the scenario sends where nobody can receive it
    plans = plan_runs(DemoConfig(runs=60, drop_rate=0.5, seed=3))
    assert first["unguarded"]["lost"] == sum(Timeline.of(plan).bare_loss for plan in plans)
    assert first["guarded"]["lost"] == 0


def test_without_resume_the_guard_loses_what_silent_drops_swallow(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, report = demo_json(
        capsys, "--runs", "60", "--drop-rate", "0.5", "--seed", "3", "--setup", "guard"
    )
    plans = plan_runs(DemoConfig(runs=60, drop_rate=0.5, seed=3))
    swallowed = sum(Timeline.of(plan).swallowed for plan in plans)
    assert swallowed > 0
    assert code == 1
    assert report["guarded"]["lost"] == swallowed
    assert report["guarded"]["out_of_order"] == 0


def test_the_timeline_orders_a_run_by_its_plan() -> None:
    drop = DropPlan(2, "drop_connection", reconnect_after=0.05, reassociate_after=0.1)
    # events at 0, 0.01, 0.03, 0.06, 0.2; associated at 0.02; dropped after event 2 (at 0.02);
    # reconnected at 0.07, associated again at 0.17
    plan = RunPlan(0, 0.02, (0.01, 0.02, 0.03, 0.14), drop)
    line = Timeline.of(plan)
    assert (line.early, line.before_drop, line.before_reconnect, line.before_reassociation) == (
        2, 2, 4, 4
    )  # fmt: skip
    assert line.silent
    assert line.swallowed == 2  # events 3 and 4 go into the dead connection
    assert line.bare_loss == 4  # events 1 and 2 before the association, 3 and 4 swallowed
    noticed_drop = dataclasses.replace(drop, kind="disconnect_user")
    noticed = Timeline.of(dataclasses.replace(plan, drop=noticed_drop))
    assert (noticed.swallowed, noticed.bare_loss) == (0, 4)
    assert Timeline.of(dataclasses.replace(plan, drop=None)).bare_loss == 2


def test_the_table_separates_seed_fixed_and_measured_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["demo", "--runs", "10", "--seed", "5", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fixed = lines.index("[fixed by the seed: the same on every run of seed 5]")
    measured = next(i for i, line in enumerate(lines) if line.startswith("[measured: these vary"))
    labels = [line.split("  ")[0] for line in lines[fixed + 1 : measured]]
    assert "events lost" in labels
    assert "delivery latency p50 (ms)" not in labels
    assert any(line.startswith("delivery latency p50 (ms)") for line in lines[measured:])
    assert any(line.startswith("Scenario: seed 5, 10 runs") for line in lines)


def test_demo_html_writes_the_guarded_runs_timelines(tmp_path: Path) -> None:
    path = tmp_path / "demo.html"
    args = ["demo", "--runs", "6", "--drop-rate", "0.5", "--seed", "3", "--no-progress"]
    code = cli.main([*args, "--html", str(path)])
    assert code == 0
    page = path.read_text(encoding="utf-8")
    assert "guarded run (6 runs, seed 3, setup resume, network clock)" in page
    assert "PASS: unguarded lost" in page
    for index in range(6):
        assert f"thread-{index}" in page
    assert "flushed" in page  # the runs that dropped: buffered, then flushed
    assert "<script" not in page  # readable without JavaScript
    assert "http" not in page.replace("http-equiv", "")  # self-contained
