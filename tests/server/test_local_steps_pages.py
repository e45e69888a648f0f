"""Local steps on the researcher's pages: the form offers it and explains refusals; the job
page shows H per agent."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from downpour.training.actions.claims import claim_work
from downpour.training.actions.jobs import JobRejected, start_job, submit_job
from downpour.training.models import Job

from .helpers import job_form, job_params, mlp_config

pytestmark = pytest.mark.django_db


def _client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_form_offers_local_steps_in_plain_words(alice: Any) -> None:
    page = _client(alice).get("/jobs/new/").content.decode()
    assert 'value="local-steps"' in page and 'value="downpour"' in page
    assert "train alone for a while" in page.lower() or "trains on its own" in page


def test_a_local_steps_job_is_submitted_with_its_settings(alice: Any, dataset: Any) -> None:
    # Execute
    response = _client(alice).post(
        "/jobs/new/",
        job_form(
            "diloco",
            str(dataset.id),
            json.dumps(mlp_config()),
            algorithm="local-steps",
            inner_steps=12,
            inner_optimizer="sgd-momentum",
            inner_learning_rate=0.01,
            outer_learning_rate=0.5,
            outer_momentum=0.8,
        ),
    )

    # Assert
    assert response.status_code == 302, response.content
    job = Job.objects.get(name="diloco")
    assert job.algorithm == Job.Algorithm.LOCAL_STEPS
    assert (job.inner_steps, job.inner_optimizer) == (12, "sgd-momentum")
    assert (job.inner_learning_rate, job.outer_learning_rate, job.outer_momentum) == (
        0.01,
        0.5,
        0.8,
    )


def test_a_local_steps_job_left_at_the_defaults_applies_whole_changes_without_momentum(
    alice: Any, dataset: Any
) -> None:
    # Execute: the researcher picks local steps and leaves the server's settings empty, and
    # the form shows the same defaults.
    page = _client(alice).get("/jobs/new/").content.decode()
    response = _client(alice).post(
        "/jobs/new/",
        job_form(
            "plain",
            str(dataset.id),
            json.dumps(mlp_config()),
            algorithm="local-steps",
            outer_learning_rate="",
            outer_momentum="",
        ),
    )

    # Assert: 1.0 and 0 (docs/benchmarks.md, "The outer step's defaults"), not DiLoCo's.
    assert response.status_code == 302, response.content
    job = Job.objects.get(name="plain")
    assert (job.outer_learning_rate, job.outer_momentum) == (1.0, 0.0)
    assert 'name="outer_learning_rate" value="1.0"' in page
    assert 'name="outer_momentum" value="0.0"' in page


def test_local_steps_with_robust_aggregation_is_refused_with_a_reason(
    alice: Any, dataset: Any
) -> None:
    response = _client(alice).post(
        "/jobs/new/",
        job_form(
            "both",
            str(dataset.id),
            json.dumps(mlp_config()),
            algorithm="local-steps",
            robust_aggregation="on",
        ),
    )
    assert response.status_code == 200
    assert b"cannot be combined with robust aggregation" in response.content
    assert not Job.objects.filter(name="both").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("outer_learning_rate", "0"),
        ("outer_learning_rate", "11"),
        ("outer_momentum", "-0.1"),
        ("outer_momentum", "1"),
    ],
)
def test_an_outer_setting_out_of_range_is_refused_and_nothing_is_made(
    alice: Any, dataset: Any, field: str, value: str
) -> None:
    response = _client(alice).post(
        "/jobs/new/",
        job_form(
            "wild",
            str(dataset.id),
            json.dumps(mlp_config()),
            algorithm="local-steps",
            **{field: value},
        ),
    )
    assert response.status_code == 200
    assert f'<ul class="errorlist" id="id_{field}_error">' in response.content.decode()
    assert not Job.objects.filter(name="wild").exists()


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("outer_learning_rate", 0.0, "outer learning rate must be in"),
        ("outer_momentum", 1.0, "outer momentum must be in"),
    ],
)
def test_outer_settings_out_of_range_are_refused_past_the_form_too(
    alice: Any, dataset: Any, field: str, value: float, reason: str
) -> None:
    # The seed command and the actions take JobParams without the form's bounds.
    with pytest.raises(JobRejected, match=reason):
        submit_job(alice, dataset, job_params(algorithm="local-steps", **{field: value}))
    assert not Job.objects.exists()


def test_running_an_old_diloco_job_again_keeps_its_outer_settings_not_the_new_defaults(
    alice: Any, dataset: Any
) -> None:
    # Prepare: a job made before the defaults changed, with DiLoCo's 0.7 / 0.9.
    _client(alice).post(
        "/jobs/new/",
        job_form(
            "old",
            str(dataset.id),
            json.dumps(mlp_config()),
            algorithm="local-steps",
            outer_learning_rate=0.7,
            outer_momentum=0.9,
        ),
    )
    old = Job.objects.get(name="old")

    # Execute: "run again" pre-fills the form from it.
    page = _client(alice).get(f"/jobs/new/?from={old.id}").content.decode()

    # Assert
    assert 'name="outer_learning_rate" value="0.7"' in page
    assert 'name="outer_momentum" value="0.9"' in page


@pytest.mark.parametrize("algorithm", ["hogwild", "lbfgs"])
def test_an_algorithm_not_offered_is_refused(alice: Any, dataset: Any, algorithm: str) -> None:
    response = _client(alice).post(
        "/jobs/new/",
        job_form("other", str(dataset.id), json.dumps(mlp_config()), algorithm=algorithm),
    )
    assert response.status_code == 200
    assert not Job.objects.filter(name="other").exists()


def test_the_job_page_shows_h_per_agent(alice: Any, dataset: Any, agent: Any) -> None:
    # Prepare: a running local-steps job with H fixed at 9, and a lease of Charlie's agent.
    _client(alice).post(
        "/jobs/new/",
        job_form(
            "h-page",
            str(dataset.id),
            json.dumps(mlp_config()),
            algorithm="local-steps",
            inner_steps=9,
            spot_check_fraction=0,
        ),
    )
    job = Job.objects.get(name="h-page")
    assert start_job(job)
    lease = claim_work(agent)
    assert lease is not None and lease.round_steps == 9

    # Execute
    page = _client(alice).get(f"/jobs/{job.id}/").content.decode()

    # Assert
    assert "H = 9" in page and f"{agent.name} 9" in page
