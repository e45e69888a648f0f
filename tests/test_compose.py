"""docker-compose.yml cannot run here (no Docker engine), so check it wires what we test."""

from __future__ import annotations

from pathlib import Path

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
    assert env["REDIS_URL"].startswith("redis://")  # the shared environment, like the others
    assert agent["profiles"] == ["trusted-agent"]  # needs a token first: never started by default
    assert agent["restart"] == "unless-stopped"
