"""A published SECRET_KEY is refused in production and by ``check --deploy``."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
REPO_DEFAULT = "dev-only-secret-key-change-me-in-production-" + "x" * 20
COMPOSE_DEFAULT = "change-me-to-a-long-random-string-before-deploying"


def manage(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "HTTPS", "DEBUG", "ALLOWED_HOSTS")
    }
    clean.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT / "agent")]),
        DJANGO_SETTINGS_MODULE="downpour.settings",
        **env,
    )
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("key", [REPO_DEFAULT, COMPOSE_DEFAULT])
def test_check_deploy_fails_with_a_key_published_in_the_repository(key: str) -> None:
    done = manage(["check", "--deploy"], SECRET_KEY=key)

    assert done.returncode != 0
    assert "downpour.E001" in done.stderr


@pytest.mark.parametrize("key", [REPO_DEFAULT, COMPOSE_DEFAULT])
def test_the_server_refuses_to_start_on_a_public_host_with_a_published_key(key: str) -> None:
    done = manage(["check"], SECRET_KEY=key, ALLOWED_HOSTS="downpour.example.org")

    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and "SECRET_KEY" in done.stderr


def test_the_server_refuses_a_published_key_behind_tls_too() -> None:
    done = manage(["check"], HTTPS="1")

    assert done.returncode != 0
    assert "SECRET_KEY" in done.stderr


def test_the_embedded_default_on_loopback_still_starts_with_the_repository_key() -> None:
    done = manage(["check"])

    assert done.returncode == 0, done.stderr


def test_a_random_key_on_a_public_host_starts() -> None:
    done = manage(["check"], SECRET_KEY=secrets.token_urlsafe(50), ALLOWED_HOSTS="example.org")

    assert done.returncode == 0, done.stderr


def test_docker_compose_gives_no_default_key() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        key = (service.get("environment") or {}).get("SECRET_KEY")
        assert key is None or key.startswith("${SECRET_KEY:?"), name
