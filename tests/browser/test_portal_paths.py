"""The portal, the console and the admin in Chromium against a real embedded server.

The researcher signs up, uploads the digits, submits a job from the form, watches the chart
grow while a real agent trains, reads a value by hovering and downloads the model; another
researcher compares runs on one chart; the operator reads the console's totals; and no page
scrolls sideways at 390 px.

Set ``DOWNPOUR_SCREENSHOTS=DIR`` to save every page at 390 px and 1440 px into DIR (the
PNGs in docs/screenshots/ come from ``DOWNPOUR_SCREENSHOTS=docs/screenshots``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.e2e.stack import Stack, held, running, wait_registered

from downpour.devprocs import manage

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
SCREENSHOTS = os.environ.get("DOWNPOUR_SCREENSHOTS")
PASSWORD = "a-long-test-passphrase-9"
NARROW = {"width": 390, "height": 844}
WIDE = {"width": 1440, "height": 900}

#: Run in the server's own `manage.py shell`: passwords for the seeded researcher and donor,
#: a staff account, and a second finished run on the seeded dataset with a short history
#: (the seeded job gets one too), so the chart has runs to compare and the admin rows.
SETUP = """
import json
from django.utils import timezone
from downpour.accounts.models import User
from downpour.training.actions.jobs import JobParams, submit_job
from downpour.training.models import Evaluation, Job
ids = json.loads({ids!r})
for name in ("demo-researcher", "demo-donor"):
    u = User.objects.get(username=name); u.set_password({password!r}); u.save()
User.objects.create_superuser("olive", "olive@example.org", {password!r})
first = Job.objects.get(id=ids["job_id"])
second = submit_job(first.owner, first.dataset, JobParams(
    name="digits-mlp-lr-0.1", model_json=json.dumps(first.model_config), learning_rate=0.1,
    target_accuracy=0.95))
for job, rate in ((first, 1.0), (second, 1.4)):
    for i in range(1, 9):
        acc = min(0.97, 0.3 + 0.7 * (1 - 0.6 ** (i * rate)))
        Evaluation.objects.create(job=job, elapsed_s=2.0 * i, samples=8000 * i,
                                  accuracy=acc, loss=2.2 * 0.65 ** (i * rate), versions=[i, i])
    Job.objects.filter(id=job.id).update(status="done", best_accuracy=acc,
        started_at=timezone.now(), finished_at=timezone.now(), status_message="target reached")
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("portal"))
    with running("embedded", workdir, UNIT_TARGET_SECONDS="5", EVAL_INTERVAL_S="3") as s:
        ids = s.seed(name="digits-mlp", data_shards=1, spot_check_fraction=0)
        manage(["shell", "-c", SETUP.format(ids=json.dumps(ids), password=PASSWORD)], s.env)
        s.ids = ids  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def new_page(browser: Any, stack: Stack, viewport: dict[str, int] = NARROW) -> Any:
    context = browser.new_context(viewport=viewport, base_url=stack.url, accept_downloads=True)
    context.set_default_timeout(20_000)
    return context.new_page()


def log_in(page: Any, username: str) -> None:
    page.goto("/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("main button")
    page.wait_for_url(lambda url: "/login/" not in url)


def scrolls_sideways(page: Any) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth > window.innerWidth"))


def fill_job_form(page: Any, name: str, budget_seconds: int) -> None:
    """The job form for a small digits MLP that runs until its budget. No trusted agent on a
    fresh install: robust aggregation and spot checks off."""
    from downpour.digits import mlp_json

    page.fill("#id_name", name)
    page.select_option("#id_dataset", label="digits")
    page.fill("#id_model_json", mlp_json([64]))
    page.fill("#id_target_accuracy", "0.999")
    page.fill("#id_budget_seconds", str(budget_seconds))
    page.click("summary:has-text('Protection against faulty volunteers')")
    page.uncheck("#id_robust_aggregation")
    page.fill("#id_spot_check_fraction", "0")


def chart_points(page: Any) -> int:
    return int(page.get_attribute("#job-chart", "data-points") or 0)


def test_a_researcher_signs_up_uploads_submits_watches_the_chart_and_downloads(
    stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from downpour.digits import digits_npz_bytes

    page = new_page(browser, stack)
    page.goto("/signup/")
    page.fill("#id_username", "rita")
    page.fill("#id_email", "rita@example.org")
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.click("main button")
    page.wait_for_url("**/jobs/")

    page.click("text=Upload a dataset")
    (tmp_path / "digits.npz").write_bytes(digits_npz_bytes())
    page.fill("#id_name", "digits")
    page.set_input_files("#id_file", str(tmp_path / "digits.npz"))
    page.click("main button")
    page.wait_for_url("**/jobs/")
    assert "1437 training" in page.inner_text(".messages")

    page.click("text=Submit a job")
    assert page.input_value("#id_n_fetch") == "4" and page.input_value("#id_n_push") == "4"
    fill_job_form(page, "first-digits", budget_seconds=25)
    page.click("main form button")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}/$"))
    assert not scrolls_sideways(page)

    stack.start_agent("browser-agent", stack.ids["token"])  # type: ignore[attr-defined]
    wait_registered(stack, "browser-agent")
    page.wait_for_function("Number(document.querySelector('#job-chart').dataset.points) >= 3")
    before = chart_points(page)
    # Evaluations come every 3 s here; throughput adds a point at every 1 s poll.
    page.wait_for_function(
        f"Number(document.querySelector('#job-chart').dataset.points) >= {before + 3}",
        timeout=8_000,
    )

    # The agents' training loss is charted beside the test loss.
    page.wait_for_function(
        "document.querySelector('#plot-loss .u-legend')?.textContent.includes('training loss')"
    )
    page.hover("#plot-accuracy .u-over")
    value = page.inner_text("#plot-accuracy .u-legend .u-series:nth-child(2) .u-value")
    assert re.fullmatch(r"\d+\.\d%", value), value

    page.wait_for_selector("#downloads:not([hidden])", timeout=120_000)
    with page.expect_download() as info:
        page.click("#downloads a:has-text('.keras')")
    path = info.value.path()
    assert Path(path).read_bytes()[:2] == b"PK"  # a .keras file is a zip
    stack.kill_agent("browser-agent")


def test_runs_on_the_same_dataset_share_the_chart_and_toggle(stack: Stack, browser: Any) -> None:
    page = new_page(browser, stack)
    log_in(page, "demo-researcher")
    page.goto(f"/jobs/{stack.ids['job_id']}/")  # type: ignore[attr-defined]
    toggle = page.get_by_label("digits-mlp-lr-0.1")
    toggle.wait_for()
    legend = "#plot-accuracy .u-legend .u-series:nth-child(3)"
    assert "digits-mlp-lr-0.1" in page.inner_text(legend)
    assert "u-off" not in (page.get_attribute(legend, "class") or "")
    toggle.uncheck()
    assert "u-off" in (page.get_attribute(legend, "class") or "")
    page.hover("#plot-loss .u-over")
    value = page.inner_text("#plot-loss .u-legend .u-series:nth-child(2) .u-value")
    assert re.fullmatch(r"\d+\.\d{4}", value), value


def test_the_operator_reads_the_totals(stack: Stack, browser: Any) -> None:
    page = new_page(browser, stack)
    log_in(page, "olive")
    online_query = "SELECT count(*) FROM donors_agent WHERE connected AND banned_at IS NULL"
    before = stack.query(online_query)[0][0]
    page.goto("/console/")
    after = stack.query(online_query)[0][0]
    assert page.inner_text("#total-agents").split()[0] in {str(before), str(after)}
    jobs = page.inner_text("#total-jobs")
    done = stack.query("SELECT count(*) FROM training_job WHERE status = 'done'")[0][0]
    assert f"{done} done" in jobs
    assert re.fullmatch(r"[\d,]+", page.inner_text("#total-samples"))
    assert re.search(r"\d", page.inner_text("#total-store"))
    page.click("#total-jobs a:has-text('done')")
    page.wait_for_url("**/admin/training/job/?status__exact=done")
    assert page.locator("#result_list tbody tr").count() == done


def test_the_admin_bans_and_unbans_an_agent(stack: Stack, browser: Any) -> None:
    (agent_name,) = stack.query("SELECT name FROM donors_agent LIMIT 1")[0]
    page = new_page(browser, stack, WIDE)
    log_in(page, "olive")
    page.goto("/admin/donors/agent/")
    page.check(f"#result_list tr:has-text('{agent_name}') input.action-select")
    page.select_option("select[name=action]", "ban_selected")
    page.click("button[name=index]")
    assert "Banned 1 agent" in page.inner_text(".messagelist")
    page.goto("/admin/donors/agent/?banned=yes")
    assert agent_name in page.inner_text("#result_list")
    page.check(f"#result_list tr:has-text('{agent_name}') input.action-select")
    page.select_option("select[name=action]", "unban_selected")
    page.click("button[name=index]")
    assert "Lifted the ban on 1 agent" in page.inner_text(".messagelist")
    assert stack.query("SELECT count(*) FROM donors_agent WHERE banned_at IS NOT NULL")[0][0] == 0


def pages(stack: Stack) -> list[tuple[str | None, str, str]]:
    """(persona, path, screenshot name) for every page."""
    job = stack.ids["job_id"]  # type: ignore[attr-defined]
    return [
        (None, "/", "home"),
        (None, "/login/", "login"),
        (None, "/signup/", "signup"),
        ("demo-researcher", "/jobs/", "jobs"),
        ("demo-researcher", "/jobs/new/", "job-form"),
        ("demo-researcher", "/jobs/datasets/new/", "dataset-upload"),
        ("demo-researcher", f"/jobs/{job}/", "job"),
        ("demo-donor", "/donor/", "donor-dashboard"),
        ("olive", "/console/", "console"),
        ("olive", "/admin/", "admin"),
        ("olive", "/admin/donors/agent/", "admin-agents"),
        ("olive", "/admin/training/job/", "admin-jobs"),
        ("olive", f"/admin/training/job/{job}/change/", "admin-job"),
    ]


@pytest.mark.parametrize("viewport", [NARROW, WIDE], ids=["390px", "1440px"])
def test_no_page_scrolls_sideways(stack: Stack, browser: Any, viewport: dict[str, int]) -> None:
    sideways = []
    logged_in: dict[str | None, Any] = {}
    for persona, path, name in pages(stack):
        if persona not in logged_in:
            logged_in[persona] = new_page(browser, stack, viewport)
            if persona is not None:
                log_in(logged_in[persona], persona)
        page = logged_in[persona]
        page.goto(path)
        assert page.url.endswith(path), f"{persona} was sent from {path} to {page.url}"
        if name == "job":
            page.wait_for_selector("#plot-accuracy .u-over")
        if name == "job-form":  # the folded groups must fit too
            page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")
        if scrolls_sideways(page):
            sideways.append(path)
        if SCREENSHOTS:
            save_screenshot(page, Path(SCREENSHOTS) / f"{name}-{viewport['width']}.png")
    assert not sideways, f"pages wider than {viewport['width']} px: {sideways}"


def save_screenshot(page: Any, path: Path) -> None:
    """The whole page, cut at 2,400 px and reduced to 256 colours to keep the docs small."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    image = Image.open(path).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, 2400)))
    image.quantize(colors=256).save(path, optimize=True)


def test_a_researcher_asks_for_an_average_of_the_weights_and_gets_it(
    stack: Stack, browser: Any
) -> None:
    """The form's Optimiser group: a value out of range is held back by Chromium, or comes
    back from the server with its error and nothing else lost; 0.99 is shown on the job
    page, kept by Clone, and the store an agent trains keeps the average in its
    checkpoints. Last in the module: its job would join the seeded dataset's chart that
    the tests above read."""
    from downpour.paramstore import Checkpoint, read_checkpoint

    # Prepare
    page = new_page(browser, stack)
    log_in(page, "demo-researcher")
    page.goto("/jobs/new/")
    fill_job_form(page, "averaged-digits", budget_seconds=60)
    page.click("summary:has-text('Optimiser')")

    # Execute: out of range first, then the value the help text suggests. Chromium holds
    # the form back itself (the field's max); without that check (an old browser, a
    # script), the server's error comes back in the reopened group.
    posts: list[str] = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else 0)
    page.fill("#id_weight_average", "1.5")
    page.click("main form button")
    assert page.evaluate("document.querySelector('#id_weight_average').validity.rangeOverflow")
    # Validation runs in the click's handler, before any request: a form let through would
    # have posted by the time the page answers this evaluate and the short wait.
    page.wait_for_timeout(300)
    assert posts == [] and page.locator(".errorlist").count() == 0
    page.evaluate("document.querySelector('main form').noValidate = true")
    page.click("main form button")
    page.wait_for_selector("details[open] .errorlist")
    assert len(posts) == 1
    assert "0.999" in page.inner_text("details[open] .errorlist")
    assert page.input_value("#id_name") == "averaged-digits"
    assert page.input_value("#id_spot_check_fraction") == "0"
    page.fill("#id_weight_average", "0.99")
    page.click("main form button")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}/$"))
    job_id = page.url.rstrip("/").rsplit("/", 1)[1]

    # Assert: the page says what the job is scored at; Clone keeps it.
    assert "b = 0.99" in page.inner_text("#weight-average")
    page.click("a:has-text('Clone')")
    page.wait_for_url("**/jobs/new/?from=*")
    assert float(page.input_value("#id_weight_average")) == 0.99

    # An agent trains it: the checkpoints carry an average that trails the weights. The job
    # waits, paused, until the agent has started (its clock, the 60 s, runs from there).
    with held(stack, job_id):
        stack.start_agent("average-agent", stack.ids["token"])  # type: ignore[attr-defined]
        wait_registered(stack, "average-agent")
    try:

        def newest_checkpoint() -> Checkpoint | None:
            rows = stack.query(
                "SELECT path, versions FROM training_checkpoint WHERE job_id = %s "
                "ORDER BY created_at DESC LIMIT 1",
                [job_id],
            )
            if not rows:
                return None
            path, versions = rows[0]
            versions = json.loads(versions) if isinstance(versions, str) else versions
            if min(versions) < 20:
                return None
            try:  # the server prunes checkpoints that are neither the last nor the best
                return read_checkpoint(path)
            except FileNotFoundError:
                return None

        checkpoint = stack.wait_for("a checkpoint 20 versions in", newest_checkpoint, 150)
        for state in checkpoint.states:
            assert state.average is not None
            assert not np.allclose(state.average, state.weights, atol=1e-4)
        scored, raw = checkpoint.weights(scored=True), checkpoint.weights()
        assert any(not np.array_equal(scored[name], raw[name]) for name in raw)
    finally:
        stack.kill_agent("average-agent")
