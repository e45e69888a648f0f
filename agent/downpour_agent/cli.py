"""``downpour-agent``: donate this machine's compute to a Downpour server.

::

    downpour-agent join http://server:8000 --token TOKEN
    downpour-agent device
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from downpour_agent import __version__
from downpour_agent.connection import Agent, AgentConfig
from downpour_agent.session import websocket_url

logger = logging.getLogger("downpour_agent")

TOKEN_ENV = "DOWNPOUR_TOKEN"
#: After a stop signal, quit anyway if handing the lease back takes longer than this.
STOP_GRACE_S = 15.0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/downpour-agent``, else ``~/.cache/downpour-agent``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "downpour-agent"


def default_threads() -> int:
    """All cores but one, so the donor's machine stays responsive."""
    return max(1, (os.cpu_count() or 1) - 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downpour-agent",
        description="Train researchers' models on this machine for a Downpour server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    join = sub.add_parser("join", help="connect to a server and work until stopped")
    join.add_argument("url", help="server base URL, e.g. http://localhost:8000")
    join.add_argument("--token", help=f"agent token (default: ${TOKEN_ENV})")
    join.add_argument("--name", default=socket.gethostname(), help="name shown to operators")
    join.add_argument(
        "--threads",
        type=_positive_int,
        default=default_threads(),
        help="TensorFlow intra/inter-op threads (default: cores - 1)",
    )
    join.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    join.add_argument(
        "--benchmark-seconds",
        type=_non_negative_float,
        default=1.5,
        help="length of the speed benchmark sent at registration; 0 skips it",
    )
    join.add_argument("--quiet", action="store_true", help="only warnings and errors")
    join.add_argument(
        "--exit-when-idle",
        type=_non_negative_float,
        default=None,
        metavar="SECONDS",
        help="exit 0 after this many seconds with no work available",
    )
    join.add_argument(
        "--max-steps-per-second", type=_positive_float, default=None, help="throttle training"
    )
    join.add_argument(
        "--status-interval", type=_positive_float, default=5.0, help="seconds between status lines"
    )
    join.add_argument(
        "--no-nice", action="store_true", help="keep normal priority instead of nice 10"
    )

    device = sub.add_parser("device", help="print the device description sent at registration")
    device.add_argument("--benchmark-seconds", type=_non_negative_float, default=1.5)
    device.add_argument("--threads", type=_positive_int, default=default_threads())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``downpour-agent`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "device":
        return _device(args)
    return _join(args)


def _device(args: argparse.Namespace) -> int:
    from downpour_agent.device import device_info
    from downpour_agent.trainer import configure_threads

    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(ImportError):
        configure_threads(args.threads)
    print(json.dumps(device_info(args.benchmark_seconds), indent=2))
    return 0


def _join(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print(f"downpour-agent: a token is required (--token or ${TOKEN_ENV})", file=sys.stderr)
        return 2
    try:
        websocket_url(args.url)
    except ValueError as exc:
        print(f"downpour-agent: {exc}", file=sys.stderr)
        return 2
    if not args.no_nice:
        with contextlib.suppress(OSError, AttributeError):
            os.nice(10)

    from downpour_agent.device import device_info
    from downpour_agent.trainer import configure_threads

    logger.info("measuring this machine (%.1f s benchmark)", args.benchmark_seconds)
    try:
        configure_threads(args.threads)
        # Import Keras here, not in the first work unit's worker thread.
        importlib.import_module("keras")
        device = device_info(args.benchmark_seconds)
    except ImportError:
        print(
            "downpour-agent: TensorFlow is not installed (pip install 'downpour-agent[tf]')",
            file=sys.stderr,
        )
        return 2
    config = AgentConfig(
        base_url=args.url,
        token=token,
        name=args.name,
        cache_dir=args.cache_dir,
        device=device,
        exit_when_idle_s=args.exit_when_idle,
        max_steps_per_second=args.max_steps_per_second,
        status_interval_s=None if args.quiet else args.status_interval,
    )
    return asyncio.run(_run_until_signalled(Agent(config)))


async def _run_until_signalled(agent: Agent) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    signals_seen = 0

    def force_exit() -> None:
        if main_task is not None and not main_task.done():
            logger.warning("quitting without waiting for the server")
            main_task.cancel()

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.warning("stopping: handing back the current lease (Ctrl-C again to quit now)")
            agent.request_stop()
            loop.call_later(STOP_GRACE_S, force_exit)
        else:
            force_exit()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    try:
        return await agent.run()
    except asyncio.CancelledError:
        return 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be zero or more")
    return value
