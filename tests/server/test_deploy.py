from __future__ import annotations

import secrets
import subprocess
import sys

from downpour.devprocs import ROOT, process_env


def test_the_production_settings_pass_djangos_deploy_checks() -> None:
    env = process_env(
        {
            "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "downpour.example.org",
            "HTTPS": "1",
        }
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
