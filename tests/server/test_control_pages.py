"""The controls on the pages: researchers run their jobs and datasets, donors their tokens,
operators everything; every destructive button is a confirmed POST."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Dataset, Job

from .helpers import job_params

pytestmark = pytest.mark.django_db


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def running(alice: Any, dataset: Any) -> Job:
    job = submit_job(alice, dataset, job_params(spot_check_fraction=0.0))
    assert start_job(job)
    job.refresh_from_db()
    return job


@pytest.fixture
def operator(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("olga", password="olga-pw", is_staff=True)


def test_the_job_page_says_what_the_job_does_and_offers_pause_with_confirmation(
    alice: Any, running: Job
) -> None:
    page = logged_in(alice).get(f"/jobs/{running.id}/").content.decode()

    assert "waiting for agents: none is connected" in page
    assert f'action="/jobs/{running.id}/pause/"' in page
    assert "return confirm(" in page
    assert f'action="/jobs/{running.id}/resume/"' not in page


def test_alice_pauses_and_resumes_her_job(alice: Any, running: Job) -> None:
    client = logged_in(alice)

    client.post(f"/jobs/{running.id}/pause/")
    running.refresh_from_db()
    assert (running.status, running.status_message) == ("paused", "paused by its owner")
    page = client.get(f"/jobs/{running.id}/").content.decode()
    assert "resume to carry on" in page and f'action="/jobs/{running.id}/resume/"' in page

    client.post(f"/jobs/{running.id}/resume/")
    running.refresh_from_db()
    assert running.status == "running"


def test_a_control_is_post_only(alice: Any, running: Job) -> None:
    response = logged_in(alice).get(f"/jobs/{running.id}/pause/")

    assert response.status_code == 405
    running.refresh_from_db()
    assert running.status == "running"


def test_bob_cannot_pause_alices_job_but_an_operator_can(
    bob: Any, operator: Any, running: Job
) -> None:
    assert logged_in(bob).post(f"/jobs/{running.id}/pause/").status_code == 404
    logged_in(operator).post(f"/jobs/{running.id}/pause/")
    running.refresh_from_db()
    assert (running.status, running.status_message) == ("paused", "paused by an operator")


def test_deleting_a_job_removes_its_row_store_checkpoints_and_files(
    alice: Any, running: Job
) -> None:
    from downpour.training.actions.recovery import checkpoint_job

    checkpoint = checkpoint_job(running)
    folder = Path(settings.MEDIA_ROOT) / "checkpoints" / str(running.id)
    assert Path(checkpoint.path).exists()

    logged_in(alice).post(f"/jobs/{running.id}/delete/")

    assert not Job.objects.filter(id=running.id).exists()
    assert not folder.exists() and not Path(checkpoint.path).exists()


def test_a_dataset_in_use_is_not_deleted_and_the_page_says_why(
    alice: Any, running: Job, dataset: Dataset
) -> None:
    response = logged_in(alice).post(f"/jobs/datasets/{dataset.id}/delete/", follow=True)

    assert Dataset.objects.filter(id=dataset.id).exists()
    assert "in use by 1 active job(s) (mlp)" in response.content.decode()


def test_an_unused_dataset_is_deleted_with_its_files(alice: Any, dataset: Dataset) -> None:
    folder = Path(dataset.test_path).parent

    logged_in(alice).post(f"/jobs/datasets/{dataset.id}/delete/")

    assert not Dataset.objects.filter(id=dataset.id).exists()
    assert not folder.exists()


def test_clone_fills_the_job_form_from_the_job(alice: Any, running: Job) -> None:
    page = logged_in(alice).get(f"/jobs/new/?from={running.id}").content.decode()

    assert 'value="mlp (again)"' in page
    assert "Dense" in page  # the model JSON


def test_clone_of_another_researchers_job_shows_an_empty_form_and_leaks_nothing(
    bob: Any, operator: Any, running: Job
) -> None:
    # Bob guesses Alice's job id (the Clone link is only on her page), a made-up id and junk:
    # each gets the plain form, with neither her job's name nor its model.
    for source in (str(running.id), "00000000-0000-4000-8000-000000000000", "1 OR 1=1"):
        response = logged_in(bob).get("/jobs/new/", {"from": source})
        page = response.content.decode()
        assert response.status_code == 200, source
        assert "mlp (again)" not in page and "Dense" not in page, source
    # An operator may run anyone's job again, but the owner's dataset is not put in the form
    # (its choices hold only the operator's own; the initial value must not carry it either).
    response = logged_in(operator).get(f"/jobs/new/?from={running.id}")
    assert 'value="mlp (again)"' in response.content.decode()
    assert "dataset" not in response.context["form"].initial


def test_the_donor_sees_what_each_device_does_and_revokes_with_confirmation(
    charlie: Any,
) -> None:
    token, _ = AgentToken.issue(charlie, "pc")
    Agent.objects.create(token=token, name="desk", connected=True, samples_per_s=99999)
    client = logged_in(charlie)

    page = client.get("/donor/").content.decode()
    assert "online, waiting for work" in page and "no finished work in the last hour" in page
    assert "99999" not in page  # not the registration benchmark
    assert "return confirm('Revoke token" in page

    client.post(f"/donor/tokens/{token.id}/revoke/")
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_an_operator_bans_and_unbans_from_the_console(operator: Any, charlie: Any) -> None:
    token, _ = AgentToken.issue(charlie, "pc")
    agent = Agent.objects.create(token=token, name="desk")
    client = logged_in(operator)

    client.post(f"/console/agents/{agent.id}/ban/", {"reason": "spam"})
    agent.refresh_from_db()
    assert agent.ban_reason == "spam" and agent.banned_at is not None

    client.post(f"/console/agents/{agent.id}/unban/")
    agent.refresh_from_db()
    assert agent.banned_at is None


def test_the_admin_bans_through_its_action(operator: Any, charlie: Any) -> None:
    operator.is_superuser = True
    operator.save()
    token, _ = AgentToken.issue(charlie, "pc")
    agent = Agent.objects.create(token=token, name="desk")

    logged_in(operator).post(
        "/admin/donors/agent/", {"action": "ban_selected", "_selected_action": [str(agent.id)]}
    )

    agent.refresh_from_db()
    assert agent.banned_at is not None
