"""Lint, format, types and architecture contracts are part of the test run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT / "agent")]),
    }
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("lint-imports",),
        (
            "mypy",
            "--strict",
            "platform/downpour/paramstore",
            "platform/downpour/scheduler",
            "agent/downpour_agent",
        ),
        # The Django side, with django-stubs' plugin (models, querysets, settings).
        ("mypy", "platform/downpour"),
    ],
    ids=["ruff-check", "ruff-format", "import-contracts", "mypy-strict", "mypy-django"],
)
def test_the_code_passes(command: tuple[str, ...]) -> None:
    done = run(str(BIN / command[0]), *command[1:])
    assert done.returncode == 0, done.stdout + done.stderr
