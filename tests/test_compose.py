"""docker-compose.yml cannot run here (no Docker engine), so check it wires what we test."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def services() -> dict[str, dict[str, object]]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"])


def command(service: dict[str, object]) -> str:
    cmd = service["command"]
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_compose_runs_the_processes_the_e2e_tests_run() -> None:
    found = services()
    assert {"postgres", "redis", "migrate", "web", "worker", "beat"} <= set(found)
    assert "downpour.asgi:application" in command(found["web"])
    assert "--websocket-max-message-size" in command(found["web"])
    assert "worker --pool threads" in command(found["worker"])
    assert "beat" in command(found["beat"])


def test_every_python_service_gets_both_service_urls_and_waits_for_migrations() -> None:
    found = services()
    for name in ("web", "worker", "beat"):
        env = found[name]["environment"]
        assert isinstance(env, dict)
        assert env["DATABASE_URL"].startswith("postgres://")
        assert env["REDIS_URL"].startswith("redis://")
        depends = found[name]["depends_on"]
        assert isinstance(depends, dict)
        assert depends["migrate"] == {"condition": "service_completed_successfully"}


def test_the_trusted_agent_joins_the_web_service_with_its_own_token_behind_a_profile() -> None:
    agent = services()["trusted-agent"]
    cmd = command(agent)
    assert "downpour-agent join http://web:8000" in cmd
    assert "$$DOWNPOUR_TRUSTED_TOKEN" in cmd  # expanded by the container's shell, not compose
    env = agent["environment"]
    assert isinstance(env, dict) and "DOWNPOUR_TRUSTED_TOKEN" in env
    assert agent["profiles"] == ["trusted-agent"]  # needs a token first: never started by default
    assert agent["restart"] == "unless-stopped"


SERVER_SECRETS = {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "MEDIA_ROOT", "VAR_DIR"}


@pytest.mark.parametrize("name", ["agent", "trusted-agent"])
def test_agents_run_sandboxed_without_the_servers_secrets_or_data(name: str) -> None:
    # A model that escaped TensorFlow in an agent container must find nothing of the server's.
    agent = services()[name]
    env = agent.get("environment") or {}
    assert isinstance(env, dict) and not SERVER_SECRETS & set(env)
    volumes = agent.get("volumes") or []
    assert isinstance(volumes, list)
    assert all(not str(v).startswith("downpour-data") for v in volumes)
    assert agent["build"] == {"context": "./agent"}  # the agent-only image
    assert agent["read_only"] is True
    assert agent["cap_drop"] == ["ALL"]
    assert agent["security_opt"] == ["no-new-privileges:true"]
    assert agent["user"] == "65534:65534"
    assert agent["pids_limit"] and agent["mem_limit"]


def test_the_agent_image_holds_only_the_agent_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "agent" / "Dockerfile").read_text()
    assert "USER 65534:65534" in dockerfile
    assert "platform" not in dockerfile and "manage.py" not in dockerfile
    # The cache volume is created from the image, so it must exist there, owned by the user.
    assert "chown 65534:65534 /cache" in dockerfile and "XDG_CACHE_HOME=/cache" in dockerfile
