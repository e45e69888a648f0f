"""``make serve``: one command serves the portal on the embedded default and keeps its data."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from downpour import devprocs

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_from_a_terminal() -> None:
    """In the child: Ctrl-C delivered and handled by default, as in a terminal. A test run
    started in the background inherits SIGINT ignored (and a thread of the run may have it
    blocked); either passes to serve through fork and exec, and serve then never sees the
    Ctrl-C below. Three full runs started with `nohup ... &` failed so."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _serve(var: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "downpour.serve", "--port", str(port), "--var", str(var)],
        env=devprocs.process_env({}),
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=devprocs.ROOT,
        start_new_session=True,
        preexec_fn=_as_from_a_terminal,  # noqa: PLW1509 - a test, no threads forking here
    )
    devprocs.SPAWNED.append(proc)
    return proc


def _interrupt(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Ctrl-C, as a user stops it: it exits in well under a second."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        raise AssertionError(f"serve ignored Ctrl-C for 30 s; its log:\n{log.read_text()}") from exc


def test_serve_prints_its_url_and_keeps_its_data_between_runs(tmp_path: Path) -> None:
    # Prepare
    var, port, log = tmp_path / "serve", _free_port(), tmp_path / "serve.log"

    # Execute: first run, an operator account made as the printed command says, second run
    first = _serve(var, port, log)
    try:
        devprocs.wait_http(f"http://127.0.0.1:{port}/", first, log, 90)
    finally:
        _interrupt(first, log)
    printed = log.read_text()
    devprocs.manage(
        ["createsuperuser", "--no-input", "--username", "olga", "--email", "o@example.org"],
        {"VAR_DIR": str(var)},
    )
    second = _serve(var, port, log)
    try:
        devprocs.wait_http(f"http://127.0.0.1:{port}/login/", second, log, 90)
    finally:
        _interrupt(second, log)

    # Assert
    assert f"http://127.0.0.1:{port}/" in printed
    assert "createsuperuser" in printed and f"VAR_DIR={var}" in printed
    assert (var / "db.sqlite3").exists()
    users = devprocs.manage(
        ["shell", "-c", "from downpour.accounts.models import User; print(User.objects.count())"],
        {"VAR_DIR": str(var)},
    )
    assert users.strip().splitlines()[-1] == "1"
