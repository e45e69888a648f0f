from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from downpour.devprocs import ROOT, process_env

from .helpers import mlp_config

# Each test runs ``manage.py check_model``, a process that imports TensorFlow.
pytestmark = pytest.mark.slow


def check_model(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check_model", str(path)],
        capture_output=True,
        text=True,
        env=process_env({}),
        timeout=120,
        check=False,
    )


def test_check_model_accepts_a_keras_mlp_and_summarises_it(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(mlp_config()))
    done = check_model(path)
    assert done.returncode == 0, done.stderr
    assert "accepted" in done.stdout
    assert str(8 * 16 + 16 + 16 * 3 + 3) in done.stdout.replace(",", "")


def test_check_model_rejects_a_lambda_and_says_why(tmp_path: Path) -> None:
    config = mlp_config()
    config["config"]["layers"][1]["class_name"] = "Lambda"
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config))
    done = check_model(path)
    assert done.returncode == 1
    assert "Lambda" in done.stderr and "Traceback" not in done.stderr


def test_check_model_reports_a_missing_file_without_a_traceback(tmp_path: Path) -> None:
    done = check_model(tmp_path / "nope.json")
    assert done.returncode == 1 and "cannot read" in done.stderr and "Traceback" not in done.stderr
