"""Job control and authority in Chromium against a real server (embedded default).

The researcher pauses and resumes her job from its page, confirming each; the donor
revokes a token while its agent runs, and the agent is cut off.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.stack import Stack, running, wait_registered

from downpour.devprocs import manage
from downpour_agent.connection import EXIT_FATAL

#: Debian's chromium, launched as in test_agent_status_page.py.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
SCREENSHOTS = os.environ.get("DOWNPOUR_SCREENSHOTS")

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

PASSWORD = "a-long-pass-123"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("browser-control"))
    with running("embedded", workdir, UNIT_TARGET_SECONDS="5") as deployment:
        yield deployment


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def shoot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def set_password(stack: Stack, username: str) -> None:
    code = (
        "from downpour.accounts.models import User; "
        f"u = User.objects.get(username={username!r}); "
        f"u.set_password({PASSWORD!r}); u.save()"
    )
    manage(["shell", "-c", code], stack.env)


def log_in(browser: Any, stack: Stack, username: str) -> Any:
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    confirmations: list[str] = []
    page.on("dialog", lambda dialog: (confirmations.append(dialog.message), dialog.accept()))
    page.confirmations = confirmations
    page.goto(f"{stack.url}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    page.wait_for_load_state()
    return page


def test_the_researcher_pauses_and_resumes_her_job_from_its_page(
    stack: Stack, browser: Any
) -> None:
    from playwright.sync_api import expect

    # Prepare: a running job with no agent yet
    seeded = stack.seed(target_accuracy=0.99, name="digits-browser-pause")
    job_id = seeded["job_id"]
    stack.wait_for("the job to start", lambda: stack.job(job_id)["status"] == "running", 120)
    set_password(stack, "demo-researcher")
    page = log_in(browser, stack, "demo-researcher")

    # Execute: pause, confirming
    page.goto(f"{stack.url}/jobs/{job_id}/")
    expect(page.locator("#activity")).to_contain_text("waiting for agents")
    page.click("button[name=pause]")

    # Assert
    expect(page.locator("#status")).to_have_text("paused")
    expect(page.locator("#activity")).to_contain_text("paused by its owner")
    assert page.confirmations and "Pause job" in page.confirmations[-1]
    assert stack.job(job_id)["status"] == "paused"
    shoot(page, "job-paused.png")

    # Execute: resume, confirming
    page.click("button[name=resume]")

    # Assert
    expect(page.locator("#status")).to_have_text("running")
    assert "Resume job" in page.confirmations[-1]
    assert stack.job(job_id)["status"] == "running"
    page.click("button[name=cancel]")
    expect(page.locator("#status")).to_have_text("failed")


def test_a_dismissed_confirmation_changes_nothing(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    seeded = stack.seed(target_accuracy=0.99, name="digits-browser-dismiss")
    job_id = seeded["job_id"]
    stack.wait_for("the job to start", lambda: stack.job(job_id)["status"] == "running", 120)
    set_password(stack, "demo-researcher")
    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.dismiss())
    page.goto(f"{stack.url}/login/")
    page.fill("input[name=username]", "demo-researcher")
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    page.goto(f"{stack.url}/jobs/{job_id}/")

    page.click("button[name=pause]")

    expect(page.locator("#status")).to_have_text("running")
    assert stack.job(job_id)["status"] == "running"
    manage(["control", "cancel", job_id], stack.env)


def test_the_donor_revokes_a_token_while_its_agent_runs_and_the_agent_is_cut_off(
    stack: Stack, browser: Any
) -> None:
    from playwright.sync_api import expect

    # Prepare: an agent working on a job
    seeded = stack.seed(target_accuracy=1.0, budget_seconds=300, name="digits-browser-revoke")
    # Slowed to 1 step/s, so its lease is still live when the page loads and when the
    # revocation lands (a first unit of 20 steps is done in well under a second at full speed).
    agent = stack.start_agent("browser-victim", seeded["token"], "--max-steps-per-second", "1")
    wait_registered(stack, "browser-victim")
    stack.wait_for(
        "the agent to hold a lease",
        lambda: stack.query(
            "SELECT 1 FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "WHERE a.name = 'browser-victim' AND l.status = 'active'"
        ),
        120,
    )
    set_password(stack, "demo-donor")
    page = log_in(browser, stack, "demo-donor")
    page.goto(f"{stack.url}/donor/")
    expect(page.locator("td.device-doing", has_text="training")).to_be_visible()
    prefix = seeded["token"][:10]
    row = page.locator("tr", has_text=prefix)

    # Execute
    row.locator("button[name=revoke]").click()

    # Assert: confirmed, revoked, and the agent process told and gone
    assert "Revoke token" in page.confirmations[-1]
    expect(page.locator("tr", has_text=prefix)).to_contain_text("revoked")
    assert agent.wait(timeout=60) == EXIT_FATAL
    log = (stack.workdir / "browser-victim.log").read_text(errors="replace")
    assert "rejected the token" in log
    assert not stack.query(
        "SELECT 1 FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
        "WHERE a.name = 'browser-victim' AND l.status = 'active'"
    )
    page.goto(f"{stack.url}/donor/")
    expect(page.locator("td.device-doing").first).to_contain_text("cut off")
    shoot(page, "donor-revoked.png")
    manage(["control", "cancel", seeded["job_id"]], stack.env)
