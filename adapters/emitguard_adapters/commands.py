"""``emitguard demo``: added to the command line through the ``emitguard_add_commands`` hook.

The demo needs Starlette, uvicorn and websockets; they are imported only when it runs, so the
command line (and every guard, which loads this plugin) works without them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from emitguard import hookimpl

__all__ = ["emitguard_add_commands"]


@hookimpl
def emitguard_add_commands(commands: Any) -> None:
    from emitguard.cli import _positive_int, add_demo_arguments
    from emitguard.demo import DemoConfig

    demo = commands.add_parser(
        "demo",
        help="the lost-events race over real sockets (uvicorn + websockets), unguarded and guarded",
        description=(
            "Serve a Starlette app with the report's legacy manager under uvicorn on "
            "127.0.0.1 and run concurrent websockets clients against it, first bare, then "
            "guarded; some clients drop and reconnect mid-run. Exit code 0 when the guarded "
            "run lost, duplicated and reordered nothing, 1 otherwise."
        ),
    )
    add_demo_arguments(demo, DemoConfig(runs=200, lag=0.05, drop_rate=0.2))
    demo.add_argument(
        "--setup",
        choices=("guard", "middleware", "resume"),
        default="resume",
        help=(
            "what the guarded app adds: the guard line only, plus EmitGuardMiddleware, or plus "
            "replaying what a reconnecting client missed (default: %(default)s)"
        ),
    )
    demo.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help=(
            "server processes: more than 1 runs each agent in one worker and its client on "
            "another, reconnecting to a third, the guarded app on one Redis (default: "
            "%(default)s)"
        ),
    )
    demo.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help=(
            "the Redis of --workers (keys under a prefix of the run's own, deleted after); "
            "default: a redis-server started for the run when one is installed, else "
            "redis://127.0.0.1:6379/0"
        ),
    )
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from emitguard.cli import print_report, recording, write_html
    from emitguard.demo import DemoConfig, ProgressBar

    try:
        from emitguard_adapters.socket_demo import run_socket_demo
    except ImportError as exc:
        print(
            f"emitguard demo needs starlette, uvicorn and websockets ({exc}); "
            "pip install 'emitguard[demo]' (from a checkout, the wheel with the extra: "
            "pip install 'dist/emitguard-<version>-py3-none-any.whl[demo]'), "
            "or run `emitguard simulate`",
            file=sys.stderr,
        )
        return 2
    config = DemoConfig(runs=args.runs, seed=args.seed, lag=args.lag, drop_rate=args.drop_rate)
    progress = ProgressBar(sys.stderr, enabled=not args.no_progress and sys.stderr.isatty())
    with recording(args.html) as recorder:
        if args.workers > 1:
            report = _across_workers(args, config, progress)
        else:
            report = run_socket_demo(
                config, progress=progress, show_legacy_logs=args.legacy_logs, setup=args.setup
            )
    if report is None:
        return 2
    write_html(args.html, report, recorder)
    return print_report(report, args.json)


def _across_workers(args: argparse.Namespace, config: Any, progress: Any) -> Any:
    """``--workers N``: the report, or None (said why on stderr) when it cannot run."""
    if args.setup != "resume" or args.html is not None:
        print("emitguard demo --workers runs the resume setup, without --html", file=sys.stderr)
        return None
    try:
        from emitguard_adapters.workers_demo import run_workers_demo
    except ImportError as exc:
        why = f"emitguard demo --workers needs redis-py ({exc}): pip install 'emitguard[redis]'"
        print(why, file=sys.stderr)
        return None
    return run_workers_demo(
        config,
        workers=args.workers,
        redis_url=args.redis,
        progress=progress,
        show_legacy_logs=args.legacy_logs,
    )
