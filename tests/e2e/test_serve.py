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


def _serve(var: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    return devprocs.spawn(
        [sys.executable, "-m", "downpour.serve", "--port", str(port), "--var", str(var)],
        {},
        log,
    )


def _interrupt(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Ctrl-C, as a user stops it, and a second one if the first is ignored.

    It exits in well under a second on a quiet machine. In two full runs with a CPU hog
    beside them daphne did not exit after the signal, and the second time its log showed
    its shutdown never began (not diagnosed yet), so a user's second Ctrl-C is part of the
    path; the test still fails if neither stops it."""
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    raise AssertionError(f"serve ignored two Ctrl-C's, 30 s apart; its log:\n{log.read_text()}")


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
