"""``emitguard demo --workers N``: the socket demo across worker processes on one real
redis-server (started by the test on a free port)."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from emitguard import cli
from emitguard.demo import DemoConfig
from emitguard_adapters.workers_demo import run_workers_demo
from redis_support import RedisServer


def _keys(url: str) -> list[Any]:
    import redis

    with redis.Redis.from_url(url) as client:
        return list(client.scan_iter(match="*"))


def test_across_three_workers_nothing_is_lost_and_the_keys_go(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", "--workers", "3", "--runs", "30", "--drop-rate", "0.5", "--seed", "5"]
    code = cli.main([*args, "--redis", redis_server.url, "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    bare, safe = report["unguarded"], report["guarded"]
    assert (code, report["ok"], report["workers"]) == (0, True, 3)
    assert bare["emitted"] == safe["emitted"] == 150
    assert bare["drops"] == safe["drops"] > 0
    # unguarded, no run's agent shares a worker with its client's first socket
    assert bare["lost"] > 0
    assert bare["legacy_warnings"] > 0
    assert (safe["lost"], safe["out_of_order"], safe["repeated"]) == (0, 0, 0)
    assert safe["delivered"] == 150
    # (guarded "Cannot deliver" warnings may occur: a worker delivering to a socket whose
    # client has just killed it; those events reach the client by its resume, as counted above)
    assert safe["still_buffered"] == 0
    assert safe["outcomes"]["buffered"] == 150  # every send went into the shared log
    assert 0 < safe["outcomes"]["flushed"] <= 150  # the rest reached clients by replay
    assert not any(safe["outcomes"].get(o, 0) for o in ("dropped", "expired", "failed"))
    assert "worker processes on one Redis" in " ".join(report["notes"])
    assert _keys(redis_server.url) == []  # the run's keys are deleted after it


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_two_workers_on_a_redis_server_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    # no --redis: the demo starts a redis-server of its own on a free port
    report = run_workers_demo(DemoConfig(runs=10, lag=0.05, drop_rate=0.3), workers=2)
    assert report.ok
    assert (report.guarded.lost, report.workers) == (0, 2)
    with pytest.raises(ValueError, match="at least 2, got 1"):
        run_workers_demo(workers=1)
    assert cli.main(["demo", "--workers", "2", "--setup", "guard", "--no-progress"]) == 2
    assert "resume setup" in capsys.readouterr().err
