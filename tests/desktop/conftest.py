"""Fixtures for the desktop agent: a private settings dir, an X server, a governor."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from downpour_agent.desktop import settings as cfg


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$DOWNPOUR_CONFIG`` in a temporary dir, so no test reads or writes ~/.config."""
    path = tmp_path / "downpour" / "agent.toml"
    monkeypatch.setenv(cfg.CONFIG_ENV, str(path))
    return path


@pytest.fixture
def xvfb(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private X server (Xvfb); yields its display name, e.g. ``:3``."""
    if shutil.which("Xvfb") is None or shutil.which("xdotool") is None:
        pytest.fail("Xvfb and xdotool are needed (apt-get install xvfb xdotool; .ci/run does)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        number = fh.readline().strip()  # written once the server accepts connections
    assert number, "Xvfb did not start"
    display = f":{number}"
    monkeypatch.setenv("DISPLAY", display)
    try:
        yield display
    finally:
        proc.terminate()
        proc.wait(10)


def press_key(display: str) -> None:
    """A real key press through the XTEST extension, as a person's would arrive."""
    subprocess.run(["xdotool", "key", "shift"], env={**os.environ, "DISPLAY": display}, check=True)
