"""The agent's status page in Chromium: log in with the one-time link, read the state,
pause and resume, stop after the unit, change a setting.

Set ``DOWNPOUR_SCREENSHOTS=DIR`` to save the screenshots used in docs/donors.md.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from downpour_agent.desktop import settings as cfg
from downpour_agent.desktop import status as st
from downpour_agent.desktop.governor import DutyCycle, Governor, Policy
from downpour_agent.desktop.runtime import start_status_page
from downpour_agent.desktop.statuspage import StatusPage

pytestmark = [pytest.mark.browser, pytest.mark.desktop]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("DOWNPOUR_SCREENSHOTS")


@pytest.fixture
def page_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusPage]:
    monkeypatch.setenv(cfg.CONFIG_ENV, str(tmp_path / "agent.toml"))
    settings = cfg.Settings(server_url="http://downpour.example:8000", token="t", idle_after_s=180)
    policy = Policy(settings, input_idle=None, other_load=lambda: 0.0, on_battery=lambda: False)
    status = st.AgentStatus(server_url=settings.server_url, settings=settings.to_dict())
    governor = Governor(policy, DutyCycle(1.0, 1), status)
    server = start_status_page(governor, port=0)
    cfg.save(settings.replace(status_port=server.port))
    yield server
    server.stop()


@pytest.fixture
def browser_page() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 820, "height": 900})
        browser.close()


def shoot(page: object, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)  # type: ignore[attr-defined]


def test_a_donor_reads_the_state_pauses_resumes_and_changes_a_setting(
    page_server: StatusPage, browser_page: object
) -> None:
    from playwright.sync_api import Page, expect

    page: Page = browser_page  # type: ignore[assignment]
    governor = page_server.governor
    governor.status.update(
        job_id="mnist-cnn-3f2a",
        steps_done=120,
        steps_total=400,
        samples_per_s=1450.0,
        credit_today=18230.0,
        credit_total=912400.0,
    )
    governor.status.set_state(st.COMPUTING)

    # Without the login link the page holds nothing.
    page.goto(page_server.url)
    expect(page.get_by_text("downpour-agent open")).to_be_visible()

    page.goto(f"{page_server.url}login?code={page_server.new_login_code()}")
    expect(page.locator("#state")).to_have_text("computing")
    expect(page.locator("#job")).to_contain_text("mnist-cnn-3f2a (step 120 of 400)")
    expect(page.locator("#speed")).to_have_text("1450 samples/s")
    expect(page.locator("#credit-today")).to_have_text("18230")
    expect(page.locator("select[name=mode]")).to_have_value("idle")
    shoot(page, "status-computing.png")

    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#reason")).to_have_text("— paused by you")
    assert governor.paused_by_donor
    shoot(page, "status-paused.png")

    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#state")).to_have_text("computing")
    assert not governor.paused_by_donor

    page.get_by_role("button", name="Stop after this unit").click()
    expect(page.locator("#state")).to_have_text("computing (stopping after this unit)")
    assert governor.stopping_after_unit

    page.locator("input[name=cpu_share]").fill("50")
    page.locator("select[name=mode]").select_option("always")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#message")).to_have_text("saved")
    saved = cfg.load()
    assert (saved.cpu_share, saved.mode, saved.token) == (0.5, "always", "t")

    page.locator("select[name=mode]").select_option("schedule")
    page.locator("input[name=schedule]").fill("22-07")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#message")).to_contain_text('is not "HH:MM-HH:MM"')
    assert cfg.load().mode == "always"


def test_on_a_phone_width_screen_the_page_fits_and_its_buttons_work(
    page_server: StatusPage, browser_page: object
) -> None:
    from playwright.sync_api import Page, expect

    # Prepare: 390 px, the width of a common phone, paused because the person is active
    page: Page = browser_page  # type: ignore[assignment]
    page.set_viewport_size({"width": 390, "height": 844})
    governor = page_server.governor
    governor.status.update(job_id="mnist-cnn-3f2a", steps_done=120, steps_total=400)
    governor.status.set_state(st.PAUSED, st.PERSON_ACTIVE)

    # Execute
    page.goto(f"{page_server.url}login?code={page_server.new_login_code()}")
    expect(page.locator("#reason")).to_have_text("— the person is active")
    shoot(page, "status-phone.png")

    # Assert: nothing wider than the screen, and the buttons answer
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#reason")).to_have_text("— paused by you")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#reason")).to_have_text("— the person is active")
