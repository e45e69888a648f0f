"""Run the agent at login: a systemd user unit (Linux), a launchd agent (macOS) or a
scheduled task (Windows).

Each ``*_text`` function only builds the file, so it can be checked anywhere;
:func:`install` writes it and registers it with the system's service manager.
"""

from __future__ import annotations

import plistlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from xml.sax.saxutils import escape

UNIT_NAME: Final = "downpour-agent.service"
LAUNCHD_LABEL: Final = "org.downpour.agent"
TASK_NAME: Final = "Downpour agent"


def agent_command(python: str | None = None, config: Path | None = None) -> list[str]:
    """The command the service runs: this Python's agent, with the saved settings."""
    argv = [python or sys.executable, "-m", "downpour_agent"]
    if config is not None:
        argv += ["--config", str(config)]
    return [*argv, "join"]


def systemd_unit_text(command: Sequence[str]) -> str:
    return f"""[Unit]
Description=Downpour volunteer agent (computes when this computer is idle)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={shlex.join(command)}
Restart=on-failure
RestartSec=30
Nice=10
IOSchedulingClass=idle
CPUSchedulingPolicy=idle

[Install]
WantedBy=default.target
"""


def launchd_plist_bytes(command: Sequence[str], log_dir: Path) -> bytes:
    return plistlib.dumps(
        {
            "Label": LAUNCHD_LABEL,
            "ProgramArguments": list(command),
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},
            "ProcessType": "Background",
            "LowPriorityIO": True,
            "Nice": 10,
            "StandardOutPath": str(log_dir / "downpour-agent.log"),
            "StandardErrorPath": str(log_dir / "downpour-agent.log"),
        }
    )


def windows_task_xml(command: Sequence[str]) -> str:
    """Task Scheduler XML: start at logon, below-normal priority, restart on failure."""
    program, *args = command
    return f"""<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>Downpour volunteer agent</Description>
  </RegistrationInfo>
  <Triggers>
    <LogonTrigger><Enabled>true</Enabled></LogonTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <LogonType>InteractiveToken</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <Priority>7</Priority>
    <RestartOnFailure><Interval>PT1M</Interval><Count>999</Count></RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(program)}</Command>
      <Arguments>{escape(subprocess.list2cmdline(args))}</Arguments>
    </Exec>
  </Actions>
</Task>
"""


@dataclass(frozen=True)
class ServiceFile:
    """Where the service file goes and the commands that register and remove it."""

    path: Path
    content: bytes
    enable: list[list[str]]
    disable: list[list[str]]


def service_file(platform: str, home: Path, command: Sequence[str]) -> ServiceFile:
    """The service file for ``platform`` (``sys.platform``) under ``home``."""
    if platform.startswith("linux"):
        path = home / ".config" / "systemd" / "user" / UNIT_NAME
        return ServiceFile(
            path,
            systemd_unit_text(command).encode(),
            [
                ["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", UNIT_NAME],
            ],
            [["systemctl", "--user", "disable", "--now", UNIT_NAME]],
        )
    if platform == "darwin":
        path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        return ServiceFile(
            path,
            launchd_plist_bytes(command, home / "Library" / "Logs"),
            [["launchctl", "load", "-w", str(path)]],
            [["launchctl", "unload", "-w", str(path)]],
        )
    if platform == "win32":
        path = home / "AppData" / "Local" / "downpour" / "downpour-agent-task.xml"
        return ServiceFile(
            path,
            windows_task_xml(command).encode("utf-16"),
            [["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(path), "/F"]],
            [["schtasks", "/Delete", "/TN", TASK_NAME, "/F"]],
        )
    raise OSError(f"no service manager known for {platform!r}")


def install(service: ServiceFile, *, register: bool = True) -> list[str]:
    """Write the file and (``register``) run the enable commands; returns what was done."""
    service.path.parent.mkdir(parents=True, exist_ok=True)
    service.path.write_bytes(service.content)
    done = [f"wrote {service.path}"]
    if register:
        done += _run_all(service.enable)
    return done


def uninstall(service: ServiceFile, *, register: bool = True) -> list[str]:
    """Run the disable commands (``register``) and remove the file."""
    done = _run_all(service.disable) if register and service.path.exists() else []
    if service.path.exists():
        service.path.unlink()
        done.append(f"removed {service.path}")
    else:
        done.append(f"nothing to remove at {service.path}")
    return done


def _run_all(commands: list[list[str]]) -> list[str]:
    done = []
    for argv in commands:
        if shutil.which(argv[0]) is None:
            done.append(f"skipped {shlex.join(argv)} ({argv[0]} not found)")
            continue
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        outcome = "ran" if result.returncode == 0 else f"failed ({result.stderr.strip()})"
        done.append(f"{outcome}: {shlex.join(argv)}")
    return done
