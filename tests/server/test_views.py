"""Pages and endpoints: what Alice, Bob, Charlie and a stranger each get."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from downpour.donors.models import AgentToken, hash_token
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobParams, submit_job
from downpour.training.models import Dataset, Job

from .helpers import job_form, mlp_config, npz_upload, small_dataset

pytestmark = pytest.mark.django_db


def logged_in(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def job(alice):  # type: ignore[no-untyped-def]
    dataset = create_dataset(alice, "tiny", npz_upload(**small_dataset()))
    return submit_job(
        alice, dataset, JobParams(name="mlp", model_json=mlp_config(), target_accuracy=0.9)
    )


def test_signup_creates_a_researcher_and_logs_them_in() -> None:
    client = Client()
    response = client.post(
        "/signup/",
        {
            "username": "dana",
            "password1": "a-long-pass-123",
            "password2": "a-long-pass-123",
            "is_researcher": "on",
        },
    )
    assert response.status_code == 302
    assert client.get("/jobs/").status_code == 200


def test_it_uploads_a_dataset_through_the_portal(alice) -> None:  # type: ignore[no-untyped-def]
    response = logged_in(alice).post(
        "/jobs/datasets/new/",
        {"name": "tiny", "file": npz_upload(**small_dataset()), "n_shards": 2},
    )
    assert response.status_code == 302
    assert Dataset.objects.get(owner=alice).n_train == 60


def test_a_bad_upload_shows_the_reason_and_stores_nothing(alice) -> None:  # type: ignore[no-untyped-def]
    bad = {**small_dataset()}
    del bad["x_test"]
    response = logged_in(alice).post(
        "/jobs/datasets/new/", {"name": "bad", "file": npz_upload(**bad), "n_shards": 2}
    )
    assert response.status_code == 200
    assert b"missing arrays x_test" in response.content
    assert not Dataset.objects.exists()


def test_it_submits_a_job_from_pasted_json(alice, job) -> None:  # type: ignore[no-untyped-def]
    response = logged_in(alice).post(
        "/jobs/new/",
        job_form("second", str(job.dataset_id), json.dumps(mlp_config())),
    )
    assert response.status_code == 302, response.content
    assert Job.objects.filter(owner=alice, name="second").exists()


def test_a_job_chooses_int8_compression_and_its_page_says_so(alice, job) -> None:  # type: ignore[no-untyped-def]
    client = logged_in(alice)
    form = client.get("/jobs/new/").content.decode()
    assert "int8 with error feedback" in form and 'value="none"' in form

    response = client.post(
        "/jobs/new/",
        job_form("packed", str(job.dataset_id), json.dumps(mlp_config()), compression="int8"),
    )

    assert response.status_code == 302, response.content
    packed = Job.objects.get(owner=alice, name="packed")
    assert packed.compression == "int8"
    assert "int8 with error feedback" in client.get(f"/jobs/{packed.id}/").content.decode()
    refused = client.post(
        "/jobs/new/",
        job_form("odd", str(job.dataset_id), json.dumps(mlp_config()), compression="top-k"),
    )
    assert refused.status_code == 200 and not Job.objects.filter(name="odd").exists()


def test_a_rejected_model_is_explained_on_the_form(alice, job) -> None:  # type: ignore[no-untyped-def]
    config = mlp_config()
    config["config"]["layers"][1]["class_name"] = "Lambda"
    response = logged_in(alice).post(
        "/jobs/new/",
        job_form("evil", str(job.dataset_id), json.dumps(config)),
    )
    assert response.status_code == 200
    assert b"Lambda" in response.content
    assert not Job.objects.filter(name="evil").exists()


@pytest.mark.parametrize("suffix", ["", "metrics.json", "download/keras/", "download/weights/"])
def test_bob_cannot_see_alices_job(bob, job, suffix: str) -> None:  # type: ignore[no-untyped-def]
    assert logged_in(bob).get(f"/jobs/{job.id}/{suffix}").status_code == 404


def test_alice_watches_her_job(alice, job) -> None:  # type: ignore[no-untyped-def]
    client = logged_in(alice)
    assert client.get(f"/jobs/{job.id}/").status_code == 200
    metrics = client.get(f"/jobs/{job.id}/metrics.json").json()
    assert metrics["status"] == "queued" and metrics["points"] == []


def test_a_stranger_is_sent_to_log_in(job) -> None:  # type: ignore[no-untyped-def]
    response = Client().get(f"/jobs/{job.id}/")
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_a_donor_creates_a_token_that_is_shown_once_and_stored_hashed(charlie) -> None:  # type: ignore[no-untyped-def]
    client = logged_in(charlie)
    client.post("/donor/tokens/new/", {"name": "desktop"})
    page = client.get("/donor/").content.decode()
    token = AgentToken.objects.get(owner=charlie)
    plain = page.split("<pre>")[1].split("</pre>")[0]
    assert hash_token(plain) == token.token_hash
    assert plain not in client.get("/donor/").content.decode()


def test_a_donor_revokes_a_token_and_bob_cannot(charlie, bob) -> None:  # type: ignore[no-untyped-def]
    token, _ = AgentToken.issue(charlie, "pc")
    assert logged_in(bob).post(f"/donor/tokens/{token.id}/revoke/").status_code == 404
    logged_in(charlie).post(f"/donor/tokens/{token.id}/revoke/")
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_the_console_is_for_staff_only(alice, django_user_model) -> None:  # type: ignore[no-untyped-def]
    assert logged_in(alice).get("/console/").status_code == 302
    staff = django_user_model.objects.create_user("sam", is_staff=True)
    assert logged_in(staff).get("/console/").status_code == 200


def test_a_shard_is_served_only_to_an_agent_holding_a_live_lease(job, charlie) -> None:  # type: ignore[no-untyped-def]
    shard = job.dataset.shards.first()
    _, plain = AgentToken.issue(charlie, "pc")
    url = f"/api/agent/shards/{shard.id}/"
    assert Client().get(url).status_code == 401
    response = Client().get(url, HTTP_AUTHORIZATION=f"Bearer {plain}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
