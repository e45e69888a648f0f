"""The login services: each file generated and checked, install and uninstall."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from downpour_agent.cli import main
from downpour_agent.desktop import service

COMMAND = service.agent_command("/usr/bin/python3", Path("/home/donor/.config/downpour/a b.toml"))


def test_the_systemd_unit_runs_the_agent_at_login(tmp_path: Path) -> None:
    spec = service.service_file("linux", tmp_path, COMMAND)

    text = spec.content.decode()

    assert spec.path == tmp_path / ".config/systemd/user/downpour-agent.service"
    assert (
        "ExecStart=/usr/bin/python3 -m downpour_agent --config "
        "'/home/donor/.config/downpour/a b.toml' join"
    ) in text
    assert "WantedBy=default.target" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    spec = service.service_file("linux", tmp_path, service.agent_command())
    unit = tmp_path / service.UNIT_NAME
    unit.write_bytes(spec.content)

    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )

    problems = [line for line in done.stderr.splitlines() if service.UNIT_NAME in line]
    assert done.returncode == 0 and not problems, done.stderr


def test_the_launchd_plist_reads_back(tmp_path: Path) -> None:
    spec = service.service_file("darwin", tmp_path, COMMAND)

    plist = plistlib.loads(spec.content)

    assert spec.path == tmp_path / "Library/LaunchAgents/org.downpour.agent.plist"
    assert plist["ProgramArguments"] == COMMAND
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}


def test_the_windows_task_starts_at_logon_with_the_command(tmp_path: Path) -> None:
    spec = service.service_file("win32", tmp_path, COMMAND)

    root = ET.fromstring(spec.content.decode("utf-16"))
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}

    assert root.find("t:Triggers/t:LogonTrigger", ns) is not None
    assert root.findtext("t:Actions/t:Exec/t:Command", namespaces=ns) == "/usr/bin/python3"
    assert root.findtext("t:Actions/t:Exec/t:Arguments", namespaces=ns) == (
        '-m downpour_agent --config "/home/donor/.config/downpour/a b.toml" join'
    )
    assert spec.enable[0][:2] == ["schtasks", "/Create"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes the Linux unit")
def test_install_and_uninstall_service_write_and_remove_the_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    unit = tmp_path / ".config/systemd/user/downpour-agent.service"

    assert main(["--config", str(tmp_path / "agent.toml"), "install-service", "--no-enable"]) == 0
    assert unit.is_file()
    assert f"--config {tmp_path / 'agent.toml'} join" in unit.read_text()
    assert main(["uninstall-service", "--no-disable"]) == 0
    assert not unit.exists()
    assert f"removed {unit}" in capsys.readouterr().out
