"""emitguard Channels scenario, timed: sync agents in worker threads on channels_redis.

    python benchmarks/channels_scenario.py [--runs N] [--workers N]

The issue's second scenario as the test suite runs it once
(``tests/adapters/test_channels_redis.py``, scenario code in
``tests/adapters/test_channels.py``): 30 conversations x 15 events on channels_redis (a
``redis-server`` this script starts on a free port), the agents sync code in ``workers``
threads calling ``async_to_sync(layer.group_send)``, clients joining late and every third
dropping and reconnecting, real consumers under ``WebsocketCommunicator``. Each run times the
agents unguarded, then guarded, side by side; the target is guarded <= 2x unguarded, in every
run. Each guarded run must also lose, duplicate and reorder nothing and leave nothing buffered.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "adapters"), str(HERE.parent / "tests"), str(HERE)]

from channels_layer import start_redis  # noqa: E402
from channels_redis.core import RedisChannelLayer  # noqa: E402
from test_channels import scenario, tally  # noqa: E402

import emitguard  # noqa: E402
from emitguard_adapters.channels import guard_layer  # noqa: E402

TARGET = 2.0


async def one_run(port: int, workers: int) -> tuple[float, float, int, bool]:
    """(unguarded seconds, guarded seconds, unguarded lost, guarded clean)."""
    bare = RedisChannelLayer(hosts=[("127.0.0.1", port)])
    seen, bare_took = await scenario(bare, guarded=False, sync_workers=workers)
    lost = tally(seen, 15)[0]
    await bare.flush()
    layer = RedisChannelLayer(hosts=[("127.0.0.1", port)])
    guard = guard_layer(layer, stamp_seq="seq", ready_timeout=3.0)
    seen, took = await scenario(layer, guarded=True, sync_workers=workers)
    clean = tally(seen, 15) == (0, 0, 0) and await guard.drain(2.0) == 0
    emitguard.unguard(layer)
    await layer.flush()
    return bare_took, took, lost, clean


async def run(port: int, runs: int, workers: int) -> None:
    met = 0
    for index in range(1, runs + 1):
        bare, guarded, lost, clean = await one_run(port, workers)
        ratio = guarded / bare
        met += ratio <= TARGET and clean
        print(
            f"run {index:2d}: unguarded {bare:5.2f}s (lost {lost:3d}/450)  guarded "
            f"{guarded:5.2f}s ({'0 lost, 0 dup, 0 reorder' if clean else 'NOT CLEAN'})  "
            f"ratio {ratio:.2f}x",
            flush=True,
        )
    print(f"met (<= {TARGET}x and clean) in {met} of {runs} runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        process, port = start_redis(folder)
        if process is None or port is None:
            print("redis-server is not installed; nothing measured")
            return
        try:
            asyncio.run(run(port, args.runs, args.workers))
        finally:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
