"""The agent stands alone: its wheel installs into a fresh virtual environment, with no
checkout of this repository on the path, and its commands run from there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.desktop, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def run(*argv: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_wheel_installs_alone_and_its_commands_run(tmp_path: Path) -> None:
    # Prepare: a wheel, a fresh venv, an environment that knows nothing of this checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME="", XDG_STATE_HOME="")
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        ROOT / "agent",
        "-w",
        tmp_path / "dist",
        cwd=tmp_path,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("downpour_agent-*.whl")
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env).returncode == 0
    installed = run(venv / "bin/python", "-m", "pip", "install", "-q", wheel, cwd=tmp_path, env=env)
    assert installed.returncode == 0, installed.stderr
    agent = venv / "bin/downpour-agent"

    # Execute and assert
    helped = run(agent, "--help", cwd=tmp_path, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "install-service" in helped.stdout
    where = run(
        venv / "bin/python",
        "-c",
        "import downpour_agent; print(downpour_agent.__file__)",
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.startswith(str(venv)), where.stdout
    status = run(agent, "status", cwd=tmp_path, env=env)
    assert status.returncode == 1
    assert "the agent has not run yet" in status.stderr
    installed_unit = run(agent, "install-service", "--no-enable", cwd=tmp_path, env=env)
    assert installed_unit.returncode == 0, installed_unit.stderr
    unit = tmp_path / "home/.config/systemd/user/downpour-agent.service"
    assert f"ExecStart={venv}/bin/python -m downpour_agent join" in unit.read_text()
    removed = run(agent, "uninstall-service", "--no-disable", cwd=tmp_path, env=env)
    assert removed.returncode == 0 and not unit.exists()
