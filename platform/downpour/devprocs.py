"""Starting Downpour's processes on one machine, for the demo (and the tests' harness).

Every process is a real one (daphne, ``manage.py``, ``downpour-agent``) talking over real
sockets; this module only knows how to launch them and wait until they are ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

#: Every process started here, so a test session can make sure none outlives it.
SPAWNED: list[subprocess.Popen[bytes]] = []
#: What daphne logs once it is bound; with ``-p 0`` it names the port the kernel chose.
_LISTENING = re.compile(rb"Listening on TCP address 127\.0\.0\.1:(\d+)")
#: ``kill -USR2 <celery worker>`` writes every thread's stack to the worker's stderr (its
#: log; armed in ``downpour/celery.py``). faulthandler's handler is C: it answers even while
#: the main thread is stuck in C code, and prints no locals (Celery's SIGUSR1 dump repr()s
#: them, which can run queries).
STACKS_SIGNAL = signal.SIGUSR2


def process_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT / "agent")])
    env["DJANGO_SETTINGS_MODULE"] = "downpour.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def manage(args: Sequence[str], env: Mapping[str, str], timeout: float = 300) -> str:
    """Run ``manage.py ARGS`` to completion and return its stdout."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def spawn(args: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(
        list(args),
        env=process_env(env),
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    SPAWNED.append(proc)
    return proc


def start_server(
    env: Mapping[str, str], log: Path, port: int = 0, timeout: float = 90
) -> tuple[subprocess.Popen[bytes], int]:
    """Start daphne on 127.0.0.1 and wait until it answers HTTP; return it and its port.

    With ``port=0`` (the default) the kernel picks a free port as daphne binds, and the
    port is read from daphne's log: a port chosen beforehand could be taken by another
    process before daphne binds it. Pass a port to restart a server where it was.
    """
    # daphne closes sockets on messages over its limit (1 MiB by default) before the app
    # sees them; allow twice the app's limit so oversize frames get a structured error.
    frame_limit = int(env.get("MAX_FRAME_BYTES", os.environ.get("MAX_FRAME_BYTES", 64 << 20)))
    log_start = log.stat().st_size if log.exists() else 0
    proc = spawn(
        [
            str(BIN / "daphne"),
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "--websocket-max-message-size",
            str(2 * frame_limit),
            "--websocket-max-frame-size",
            str(2 * frame_limit),
            "downpour.asgi:application",
        ],
        env,
        log,
    )
    deadline = time.monotonic() + timeout
    if port == 0:
        port = _bound_port(proc, log, log_start, deadline)
    wait_http(f"http://127.0.0.1:{port}/", proc, log, max(1.0, deadline - time.monotonic()))
    return proc, port


def _bound_port(proc: subprocess.Popen[bytes], log: Path, start: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        with open(log, "rb") as fh:
            fh.seek(start)
            found = _LISTENING.search(fh.read())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"daphne exited with {proc.returncode}; see {log}")
        time.sleep(0.1)
    raise RuntimeError(f"daphne did not report its port in time; see {log}")


def start_agent(
    url: str,
    token: str,
    name: str,
    log: Path,
    extra_args: Sequence[str] = (),
    program: Sequence[str] = (),
    status_page: bool = False,
) -> subprocess.Popen[bytes]:
    """``downpour-agent join`` (or ``program join``: a wrapper taking the same arguments).

    ``status_page`` keeps the local status page (on the port its settings file,
    :func:`agent_config_path`, names);
    ``extra_args`` may override ``--mode always`` (the last ``--mode`` wins).
    """
    return spawn(
        [
            *(program or [str(BIN / "downpour-agent")]),
            "join",
            url,
            "--token",
            token,
            "--name",
            name,
            "--threads",
            "1",
            # A harness agent computes whenever there is work and serves no status page.
            "--mode",
            "always",
            *([] if status_page else ["--no-status-page"]),
            *extra_args,
        ],
        # Each agent keeps its settings and state (the credit book) beside its log, never in
        # the donor's ~/.config or ~/.local/state, which all local agents would share.
        {"TF_CPP_MIN_LOG_LEVEL": "2", "DOWNPOUR_CONFIG": str(agent_config_path(log, name))},
        log,
    )


def agent_config_path(log: Path, name: str) -> Path:
    """The settings file of agent ``name`` logging to ``log`` (``$DOWNPOUR_CONFIG``)."""
    return log.parent / name / "agent.toml"


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; see {log}")


def stop(
    procs: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, grace: float = 10
) -> None:
    """Signal each process group, then kill what is left after ``grace`` seconds."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def seed_digits_job(env: Mapping[str, str], **options: Any) -> dict[str, Any]:
    """Create a researcher, a donor token, the digits data set and a job; return their ids."""
    args = ["seed_digits_job"]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):  # a switch such as --robust
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return dict(json.loads(manage(args, env).strip().splitlines()[-1]))
