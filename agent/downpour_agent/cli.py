"""``downpour-agent``: donate this machine's compute to a Downpour server.

::

    downpour-agent join http://server:8000 --token TOKEN --save
    downpour-agent status | pause | resume | open
    downpour-agent install-service | uninstall-service
    downpour-agent device

Settings live in ``agent.toml`` (``downpour_agent.desktop.settings``); flags override it
and ``--save`` writes them back.
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
from typing import Any

from downpour_agent import __version__
from downpour_agent.connection import Agent, AgentConfig
from downpour_agent.desktop import settings as cfg
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
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"settings file (default: ${cfg.CONFIG_ENV} or {cfg.config_path()})",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    join = sub.add_parser("join", help="connect to a server and work until stopped")
    join.add_argument(
        "url", nargs="?", help="server base URL, e.g. http://localhost:8000 (default: settings)"
    )
    join.add_argument("--token", help=f"agent token (default: ${TOKEN_ENV}, then settings)")
    join.add_argument("--name", default=None, help="name shown to operators (default: host)")
    join.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="TensorFlow intra/inter-op threads (default: settings, else cores - 1)",
    )
    join.add_argument("--mode", choices=cfg.MODES, help="when to compute (default: idle)")
    join.add_argument(
        "--idle-after",
        dest="idle_after_s",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds without input before the machine counts as idle (default: 180)",
    )
    join.add_argument(
        "--schedule", help='hours to compute in mode "schedule", e.g. "22:00-07:00,12:00-13:00"'
    )
    join.add_argument(
        "--cpu-share",
        type=_share,
        metavar="FRACTION",
        help="share of each thread's time spent computing, in (0, 1] (default: 1)",
    )
    join.add_argument("--memory-limit-mb", type=_non_negative_int, metavar="MIB")
    join.add_argument(
        "--run-on-battery",
        action="store_const",
        const=True,
        default=None,
        help="keep computing when the laptop runs on battery",
    )
    join.add_argument("--gpu-device", type=int, metavar="INDEX", help="-1: never use a GPU")
    join.add_argument("--gpu-memory-limit-mb", type=_non_negative_int, metavar="MIB")
    join.add_argument("--status-port", type=_positive_int, metavar="PORT")
    join.add_argument(
        "--no-status-page", action="store_true", help="do not serve the local status page"
    )
    join.add_argument(
        "--save", action="store_true", help="write the given flags to the settings file"
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

    status = sub.add_parser("status", help="show what the running agent is doing")
    status.add_argument("--json", action="store_true", help="print the raw status")
    sub.add_parser("pause", help="pause the running agent until resumed")
    sub.add_parser("resume", help="let the running agent compute again")
    sub.add_parser("stop-after-unit", help="finish the current work unit, then stop")
    page = sub.add_parser("open", help="print (and open) a one-time login link to the page")
    page.add_argument("--no-browser", action="store_true", help="only print the link")
    install = sub.add_parser("install-service", help="start the agent at login")
    install.add_argument(
        "--no-enable", action="store_true", help="write the file without registering it"
    )
    uninstall = sub.add_parser("uninstall-service", help="stop starting the agent at login")
    uninstall.add_argument(
        "--no-disable", action="store_true", help="remove the file without unregistering it"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``downpour-agent`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    previous = os.environ.get(cfg.CONFIG_ENV)
    if args.config is not None:
        # Every desktop module finds the file (and the state beside it) through this; it is
        # put back on return so that an in-process caller's environment is left as it was.
        os.environ[cfg.CONFIG_ENV] = str(args.config.resolve())
    commands = {
        "device": _device,
        "join": _join,
        "status": _status,
        "pause": _control,
        "resume": _control,
        "stop-after-unit": _control,
        "open": _open,
        "install-service": _install_service,
        "uninstall-service": _uninstall_service,
    }
    try:
        return commands[args.command](args)
    except cfg.SettingsError as exc:
        print(f"downpour-agent: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is None:
            os.environ.pop(cfg.CONFIG_ENV, None)
        else:
            os.environ[cfg.CONFIG_ENV] = previous


def _status(args: argparse.Namespace) -> int:
    from downpour_agent.desktop.statuspage import AgentNotRunning, call, describe

    try:
        status = call("/api/status")
    except (AgentNotRunning, RuntimeError) as exc:
        print(f"downpour-agent: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else describe(status))
    return 0


def _control(args: argparse.Namespace) -> int:
    from downpour_agent.desktop.statuspage import AgentNotRunning, call, describe

    try:
        status = call(f"/api/{args.command}", method="POST", body={})
    except (AgentNotRunning, RuntimeError) as exc:
        print(f"downpour-agent: {exc}", file=sys.stderr)
        return 1
    print(describe(status))
    return 0


def _open(args: argparse.Namespace) -> int:
    import webbrowser

    from downpour_agent.desktop.statuspage import AgentNotRunning, call

    try:
        code = call("/api/login-code", method="POST", body={})["code"]
    except (AgentNotRunning, RuntimeError) as exc:
        print(f"downpour-agent: {exc}", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{cfg.load().status_port}/login?code={code}"
    print(url)
    if not args.no_browser:
        webbrowser.open(url)
    return 0


def _install_service(args: argparse.Namespace) -> int:
    from downpour_agent.desktop import service

    config = Path(os.environ[cfg.CONFIG_ENV]) if cfg.CONFIG_ENV in os.environ else None
    spec = service.service_file(sys.platform, Path.home(), service.agent_command(config=config))
    for line in service.install(spec, register=not args.no_enable):
        print(line)
    if not cfg.load().server_url:
        print(
            "note: no server in the settings yet; run "
            "`downpour-agent join URL --token TOKEN --save` once",
        )
    return 0


def _uninstall_service(args: argparse.Namespace) -> int:
    from downpour_agent.desktop import service

    spec = service.service_file(sys.platform, Path.home(), service.agent_command())
    for line in service.uninstall(spec, register=not args.no_disable):
        print(line)
    return 0


def _device(args: argparse.Namespace) -> int:
    from downpour_agent.device import device_info
    from downpour_agent.trainer import configure_threads

    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(ImportError):
        configure_threads(args.threads)
    print(json.dumps(device_info(args.benchmark_seconds), indent=2))
    return 0


def settings_from(args: argparse.Namespace) -> cfg.Settings:
    """The settings file with the given flags over it (``--save`` writes the result)."""
    flags = {
        key: getattr(args, key, None)
        for key in (
            "name",
            "threads",
            "mode",
            "idle_after_s",
            "schedule",
            "cpu_share",
            "memory_limit_mb",
            "run_on_battery",
            "gpu_device",
            "gpu_memory_limit_mb",
            "status_port",
        )
    }
    flags["server_url"] = args.url
    flags["token"] = args.token or os.environ.get(TOKEN_ENV)
    settings = cfg.with_overrides(cfg.load(), flags)
    if args.save:
        logger.info("settings written to %s", cfg.save(settings))
    return settings


def _join(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    settings = settings_from(args)
    token = settings.token
    if not token:
        print(f"downpour-agent: a token is required (--token or ${TOKEN_ENV})", file=sys.stderr)
        return 2
    if not settings.server_url:
        print("downpour-agent: a server URL is required (downpour-agent join URL)", file=sys.stderr)
        return 2
    try:
        websocket_url(settings.server_url)
    except ValueError as exc:
        print(f"downpour-agent: {exc}", file=sys.stderr)
        return 2
    if not args.no_nice:
        with contextlib.suppress(OSError, AttributeError):
            os.nice(10)
    threads = settings.threads or default_threads()

    from downpour_agent.device import device_info
    from downpour_agent.trainer import configure_threads

    logger.info("measuring this machine (%.1f s benchmark)", args.benchmark_seconds)
    try:
        configure_threads(threads)
        gpu = _configure_gpu(settings)
        # Import Keras here, not in the first work unit's worker thread.
        importlib.import_module("keras")
        device = {**device_info(args.benchmark_seconds, settings.gpu_device), **gpu}
    except ImportError:
        print(
            "downpour-agent: TensorFlow is not installed (pip install 'downpour-agent[tf]')",
            file=sys.stderr,
        )
        return 2
    from downpour_agent.desktop.runtime import build_governor, start_status_page
    from downpour_agent.desktop.settings import state_dir
    from downpour_agent.desktop.status import CreditBook

    governor = build_governor(settings, threads)
    governor.status.update(gpu=device.get("gpu_name"))
    page = None
    if not args.no_status_page:
        try:
            page = start_status_page(governor)
            logger.info("status page on %s (downpour-agent open logs you in)", page.url)
        except OSError as exc:
            logger.warning("no status page: port %s: %s", settings.status_port, exc)
    credit = CreditBook(state_dir() / "credit.json")
    config = AgentConfig(
        base_url=settings.server_url,
        token=token,
        name=settings.name or socket.gethostname(),
        cache_dir=args.cache_dir,
        device=device,
        exit_when_idle_s=args.exit_when_idle,
        max_steps_per_second=args.max_steps_per_second,
        status_interval_s=None if args.quiet else args.status_interval,
        governor=governor,
        credit=credit,
        memory_limit_mb=settings.memory_limit_mb,
    )
    try:
        return asyncio.run(_run_until_signalled(Agent(config)))
    finally:
        credit.save()
        if page is not None:
            page.stop()


def _configure_gpu(settings: cfg.Settings) -> dict[str, Any]:
    """The GPU settings applied, as registration fields (none when they could not be)."""
    from downpour_agent.desktop.gpu import configure_gpu

    try:
        gpu = configure_gpu(settings.gpu_device, settings.gpu_memory_limit_mb)
    except (RuntimeError, ValueError) as exc:  # TensorFlow already initialised, bad index
        logger.warning("GPU settings not applied: %s", exc)
        return {}
    if gpu["gpu_device"]:
        logger.info("computing on %s", gpu["gpu_device"])
    return gpu


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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be zero or more")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("must be a fraction in (0, 1]")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be zero or more")
    return value
