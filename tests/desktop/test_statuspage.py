"""The local status page over HTTP: the secret, the Host and Origin checks, the buttons,
settings written back to agent.toml, and the CLI commands that call it."""

from __future__ import annotations

import http.client
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from downpour_agent.cli import main
from downpour_agent.desktop import settings as cfg
from downpour_agent.desktop import status as st
from downpour_agent.desktop.governor import DutyCycle, Governor, Policy
from downpour_agent.desktop.runtime import start_status_page
from downpour_agent.desktop.statuspage import SECRET_HEADER, StatusPage, secret_path


@pytest.fixture
def page(config_file: Path) -> Iterator[StatusPage]:
    settings = cfg.Settings(mode="always", server_url="http://server:8000", token="t")
    policy = Policy(settings, input_idle=None, other_load=lambda: 0.0, on_battery=lambda: False)
    governor = Governor(policy, DutyCycle(1.0, 1), st.AgentStatus(settings=settings.to_dict()))
    page = start_status_page(governor, port=0)
    cfg.save(settings.replace(status_port=page.port))
    yield page
    page.stop()


def request(
    page: StatusPage,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
    host: str | None = None,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=5)
    conn.putrequest(method, path, skip_host=True)
    conn.putheader("Host", host or f"127.0.0.1:{page.port}")
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    data = json.dumps(body).encode() if body is not None else b""
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    response = conn.getresponse()
    return response.status, response, response.read()


def with_secret(page: StatusPage) -> dict[str, str]:
    return {SECRET_HEADER: page.secret}


def test_the_secret_is_made_once_and_only_the_owner_can_read_it(page: StatusPage) -> None:
    path = secret_path()

    assert path.read_text() == page.secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_without_the_secret_nothing_is_shown_or_done(page: StatusPage) -> None:
    assert request(page, "GET", "/api/status")[0] == 403
    assert request(page, "POST", "/api/pause", {SECRET_HEADER: "guess"}, {})[0] == 403
    assert not page.governor.paused_by_donor


def test_another_host_name_is_refused_against_dns_rebinding(page: StatusPage) -> None:
    status, _, _ = request(
        page, "GET", "/api/status", with_secret(page), host=f"evil.example:{page.port}"
    )

    assert status == 421


def test_a_request_from_another_web_page_is_refused(page: StatusPage) -> None:
    headers = {**with_secret(page), "Origin": "http://evil.example"}

    assert request(page, "POST", "/api/pause", headers, {})[0] == 403
    assert not page.governor.paused_by_donor
    cross = {**with_secret(page), "Sec-Fetch-Site": "cross-site"}
    assert request(page, "POST", "/api/pause", cross, {})[0] == 403


def test_a_login_code_sets_the_cookie_once(page: StatusPage) -> None:
    code = page.new_login_code()

    status, response, _ = request(page, "GET", f"/login?code={code}")
    again, _, _ = request(page, "GET", f"/login?code={code}")

    assert status == 303
    cookie = response.getheader("Set-Cookie") or ""
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert again == 403
    name_value = cookie.split(";")[0]
    assert request(page, "GET", "/", {"Cookie": name_value})[0] == 200


def test_the_buttons_pause_resume_and_stop_after_the_unit(page: StatusPage) -> None:
    headers = with_secret(page)

    _, _, body = request(page, "POST", "/api/pause", headers, {})
    assert json.loads(body)["paused_by_donor"] is True
    assert page.governor.check().reason == st.BY_DONOR
    request(page, "POST", "/api/stop-after-unit", headers, {})
    assert page.governor.stopping_after_unit
    _, _, body = request(page, "POST", "/api/resume", headers, {})
    assert json.loads(body)["paused_by_donor"] is False
    assert not page.governor.stopping_after_unit


def test_settings_changed_on_the_page_are_written_to_agent_toml(
    page: StatusPage, config_file: Path
) -> None:
    status, _, _ = request(
        page, "POST", "/api/settings", with_secret(page), {"mode": "idle", "cpu_share": 0.5}
    )

    assert status == 200
    saved = cfg.load()
    assert (saved.mode, saved.cpu_share, saved.token) == ("idle", 0.5, "t")
    assert page.governor.settings.cpu_share == 0.5


def test_bad_settings_are_refused_with_the_reason(page: StatusPage) -> None:
    status, _, body = request(page, "POST", "/api/settings", with_secret(page), {"cpu_share": 3})
    token, _, token_body = request(page, "POST", "/api/settings", with_secret(page), {"token": "x"})

    assert status == 400
    assert "cpu_share must be a fraction" in json.loads(body)["error"]
    assert token == 400
    assert "token cannot be changed here" in json.loads(token_body)["error"]


def test_the_cli_commands_talk_to_the_running_agent(
    page: StatusPage, capsys: pytest.CaptureFixture[str]
) -> None:
    page.governor.status.update(job_id="job-7", steps_done=3, steps_total=10, credit_today=42.0)

    assert main(["pause"]) == 0
    assert page.governor.paused_by_donor
    assert main(["resume"]) == 0
    assert not page.governor.paused_by_donor
    capsys.readouterr()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "job: job-7 (step 3/10)" in out
    assert "credit: 42 today" in out
    assert main(["open", "--no-browser"]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith(f"http://127.0.0.1:{page.port}/login?code=")


def test_status_without_a_running_agent_says_so(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg.save(cfg.Settings(status_port=9))
    secret_path().parent.mkdir(parents=True, exist_ok=True)
    secret_path().write_text("x")

    assert main(["status"]) == 1
    assert "no agent answers on 127.0.0.1:9" in capsys.readouterr().err
