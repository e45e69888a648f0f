"""The job page's chart data, the console's totals, the admin's bans and the job form's
defaults, through Django's test client (the browser drives them in tests/browser/)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from downpour.console.totals import read_totals
from downpour.donors.models import Agent
from downpour.portal.forms import JobForm
from downpour.training.actions.contributions import Tally, record_tallies
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobParams, JobRejected, submit_job
from downpour.training.management.commands.seed_digits_job import Command as SeedDigitsJob
from downpour.training.models import Evaluation, Job

from .helpers import client_of, job_form, job_params, mlp_config, npz_upload, small_dataset

pytestmark = pytest.mark.django_db


def started(job: Job, seconds_ago: float = 30.0) -> Job:
    Job.objects.filter(id=job.id).update(
        status=Job.Status.RUNNING, started_at=timezone.now() - timedelta(seconds=seconds_ago)
    )
    job.refresh_from_db()
    return job


def test_the_chart_has_every_evaluation_and_the_agents_training_loss(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    job = started(submit_job(alice, dataset, job_params()))
    for i in range(3):
        Evaluation.objects.create(
            job=job, elapsed_s=i + 1.0, samples=100 * i, accuracy=0.5, loss=2.0 - i, versions=[]
        )
    tally = Tally(str(job.id))
    tally.add_loss(0.75, 32)
    tally.add_loss(float("nan"), 32)  # not finite: ignored
    tally.add_loss(1.25, 32)
    record_tallies(str(agent.id), {"no-such-lease": tally})

    data = client_of(alice).get(f"/jobs/{job.id}/chart.json").json()

    assert [p[0] for p in data["runs"][0]["points"]] == [1.0, 2.0, 3.0]
    assert [p[2] for p in data["runs"][0]["points"]] == [2.0, 1.0, 0.0]  # loss as it is
    assert [loss for _, loss in data["train_loss"]] == [1.0]
    assert 29 < data["train_loss"][0][0] < 60 and 29 < data["now_s"] < 60


def test_the_chart_compares_the_owners_other_runs_on_the_same_dataset(alice, bob, dataset) -> None:  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, job_params(name="first"))
    submit_job(alice, dataset, job_params(name="second"))
    other_data = create_dataset(alice, "other", npz_upload(**small_dataset()))
    submit_job(alice, other_data, job_params(name="elsewhere"))
    bobs_data = create_dataset(bob, "bobs", npz_upload(**small_dataset()))
    submit_job(bob, bobs_data, job_params(name="bobs"))

    client = client_of(alice)
    alone = client.get(f"/jobs/{job.id}/chart.json").json()
    compared = client.get(f"/jobs/{job.id}/chart.json?others=1").json()

    assert [r["name"] for r in alone["runs"]] == ["first"]
    assert [(r["name"], r["current"]) for r in compared["runs"]] == [
        ("first", True),
        ("second", False),
    ]
    assert client_of(bob).get(f"/jobs/{job.id}/chart.json").status_code == 404


def test_the_console_totals_count_agents_jobs_and_rates(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    submit_job(alice, dataset, job_params(name="queued"))
    Agent.objects.filter(id=agent.id).update(connected=True)

    totals = read_totals(timezone.now())

    assert totals.agents_online == 1
    assert totals.jobs_by_state["queued"] == 1 and totals.jobs_by_state["done"] == 0
    assert totals.samples_per_s == 0 and totals.pushes_per_s == 0
    assert totals.store_bytes is not None and totals.store_bytes >= 0


def test_the_console_shows_the_totals_to_staff(django_user_model, agent) -> None:  # type: ignore[no-untyped-def]
    olive = django_user_model.objects.create_superuser("olive", "o@example.org", "olive-pw")
    body = client_of(olive).get("/console/").content.decode()
    assert 'id="total-agents"' in body and "Store memory" in body
    assert f"/admin/donors/agent/{agent.id}/change/" in body


def test_the_admin_bans_and_lifts_the_ban(django_user_model, agent) -> None:  # type: ignore[no-untyped-def]
    olive = django_user_model.objects.create_superuser("olive", "o@example.org", "olive-pw")
    client = client_of(olive)
    changelist = "/admin/donors/agent/"

    client.post(changelist, {"action": "ban_selected", "_selected_action": [str(agent.id)]})
    agent.refresh_from_db()
    banned_list = client.get(changelist + "?banned=yes").content.decode()

    assert agent.banned_at is not None and agent.ban_reason == "banned by olive"
    assert "pc-1" in banned_list
    assert "pc-1" not in client.get(changelist + "?banned=no").content.decode()

    client.post(changelist, {"action": "unban_selected", "_selected_action": [str(agent.id)]})
    agent.refresh_from_db()
    assert agent.banned_at is None


def test_the_job_form_starts_at_the_benchmarks_best_settings(alice) -> None:  # type: ignore[no-untyped-def]
    form = JobForm(alice)
    names = ("n_fetch", "n_push", "n_param_shards", "max_staleness")
    initial = {name: form[name].initial for name in names}
    # max_staleness 64: at 64 simulated donors 13.0x against 10.6x with 16 (benchmarks.md).
    assert initial == {"n_fetch": 4, "n_push": 4, "n_param_shards": 2, "max_staleness": 64}
    # The seed command and the actions make jobs without the form: the same bound.
    assert Job._meta.get_field("max_staleness").default == 64
    assert JobParams(name="j", model_json="{}").max_staleness == 64
    seed = SeedDigitsJob().create_parser("manage.py", "seed_digits_job")
    assert seed.parse_args([]).max_staleness == 64
    first = form.groups()[0]
    assert [f.name for f in first.fields][:2] == ["name", "dataset"] and not first.advanced
    assert all(
        form[n].help_text for n in ("n_fetch", "n_push", "max_staleness", "warm_start_pushes")
    )


@pytest.mark.parametrize("value", [-1, 1_000_001])
def test_a_staleness_bound_out_of_range_is_refused_by_the_form_and_the_actions(
    alice: Any, dataset: Any, value: int
) -> None:
    form = job_form("bound", str(dataset.id), json.dumps(mlp_config()), max_staleness=value)
    if value < 0:  # the form's own floor; its ceiling is the actions'
        response = client_of(alice).post("/jobs/new/", form)
        assert response.status_code == 200 and "max_staleness" in response.context["form"].errors
    with pytest.raises(JobRejected, match="max staleness"):
        submit_job(alice, dataset, job_params(max_staleness=value))
    assert not Job.objects.exists()


def test_running_an_old_job_again_keeps_its_staleness_bound_not_the_new_default(
    alice: Any, dataset: Any
) -> None:
    # Prepare: a job made while the default was 16.
    form = job_form("old", str(dataset.id), json.dumps(mlp_config()), max_staleness=16)
    client_of(alice).post("/jobs/new/", form)
    old = Job.objects.get(name="old")

    # Execute: "run again" pre-fills the form from it.
    page = client_of(alice).get(f"/jobs/new/?from={old.id}").content.decode()

    # Assert
    assert 'name="max_staleness" value="16"' in page


def test_static_files_are_served(client) -> None:  # type: ignore[no-untyped-def]
    for path in (
        "/static/downpour/site.css",
        "/static/vendor/uplot/uPlot.iife.min.js",
        "/static/admin/css/base.css",
    ):
        response = client.get(path)
        assert response.status_code == 200, path
