"""Quotas per user, and what a finished job gives back (issue 10, Medium 7)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from downpour.paramstore import NotInitialized
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.evaluations import evaluate_job
from downpour.training.actions.jobs import (
    JobRejected,
    finish_job,
    free_finished_stores,
    start_job,
    submit_job,
)
from downpour.training.actions.recovery import checkpoint_job, ensure_store_ready
from downpour.training.datasets import DatasetRejected
from downpour.training.models import Dataset, Job
from downpour.training.store import storage

from .helpers import job_form, job_params, mlp_config, npz_upload, small_dataset

pytestmark = pytest.mark.django_db

MLP_PARAMS = 8 * 16 + 16 + 16 * 3 + 3


def logged_in(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(user)
    return client


def test_a_job_past_the_users_active_job_quota_is_refused(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    alice.max_active_jobs = 2
    alice.save()
    submit_job(alice, dataset, job_params())
    submit_job(alice, dataset, job_params())

    with pytest.raises(JobRejected, match="quota is 2"):
        submit_job(alice, dataset, job_params())
    assert Job.objects.filter(owner=alice).count() == 2


def test_a_finished_job_frees_its_place_in_the_quota(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    alice.max_active_jobs = 1
    alice.save()
    first = submit_job(alice, dataset, job_params())
    Job.objects.filter(id=first.id).update(status=Job.Status.DONE)

    submit_job(alice, dataset, job_params())


def test_the_default_quota_comes_from_the_settings(alice, dataset, settings) -> None:  # type: ignore[no-untyped-def]
    settings.QUOTA_ACTIVE_JOBS = 1
    submit_job(alice, dataset, job_params())

    with pytest.raises(JobRejected, match="quota is 1"):
        submit_job(alice, dataset, job_params())


def test_a_model_past_the_parameter_quota_is_refused(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    alice.max_params_per_job = MLP_PARAMS - 1
    alice.save()

    with pytest.raises(JobRejected, match="parameters; your quota"):
        submit_job(alice, dataset, job_params())


def test_jobs_past_the_store_memory_quota_are_refused(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    # Weights and accumulators: 8 bytes per parameter; room for one job, not two.
    alice.max_store_bytes = MLP_PARAMS * 8 + 100
    alice.save()
    submit_job(alice, dataset, job_params())

    with pytest.raises(JobRejected, match="parameter-store memory"):
        submit_job(alice, dataset, job_params())


def test_the_job_form_shows_the_quota_as_its_error(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    alice.max_params_per_job = 10
    alice.save()
    import json

    response = logged_in(alice).post(
        "/jobs/new/", job_form("big", dataset.id, json.dumps(mlp_config()))
    )

    assert response.status_code == 200
    assert b"your quota is 10 per job" in response.content
    assert not Job.objects.filter(owner=alice).exists()


def test_a_dataset_past_the_users_dataset_quota_is_refused_and_nothing_is_stored(alice) -> None:  # type: ignore[no-untyped-def]
    first = create_dataset(alice, "one", npz_upload(**small_dataset()))
    alice.max_dataset_bytes = first.stored_bytes + 100
    alice.save()

    with pytest.raises(DatasetRejected, match="your quota"):
        create_dataset(alice, "two", npz_upload(**small_dataset()))
    assert Dataset.objects.filter(owner=alice).count() == 1


def test_the_dataset_form_shows_the_quota_as_its_error(alice) -> None:  # type: ignore[no-untyped-def]
    alice.max_dataset_bytes = 1000
    alice.save()

    response = logged_in(alice).post(
        "/jobs/datasets/new/", {"name": "d", "file": npz_upload(**small_dataset()), "n_shards": 2}
    )

    assert response.status_code == 200
    assert b"your quota is" in response.content
    assert not Dataset.objects.filter(owner=alice).exists()


@pytest.fixture
def running_job(alice, dataset):  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, job_params())
    assert start_job(job)
    job.refresh_from_db()
    return job


def test_a_finished_job_is_deleted_from_the_store_and_stays_gone(running_job) -> None:  # type: ignore[no-untyped-def]
    assert storage().load_version(str(running_job.id), 0) is not None

    assert finish_job(running_job, Job.Status.DONE, "done")
    running_job.refresh_from_db()
    assert running_job.finished_at is not None
    # Pushes in flight still land: the store stays until STORE_FREE_AFTER_S has passed.
    assert free_finished_stores(running_job.finished_at) == 0
    assert storage().load_version(str(running_job.id), 0) is not None

    later = running_job.finished_at + timedelta(seconds=settings.STORE_FREE_AFTER_S)
    assert free_finished_stores(later) == 1

    assert storage().load_version(str(running_job.id), 0) is None
    assert Path(running_job.weights_path).exists()  # exported before it was freed
    with pytest.raises(NotInitialized):
        ensure_store_ready(running_job)  # a late push must not restore it
    assert storage().load_version(str(running_job.id), 0) is None


def test_checkpoints_are_pruned_to_the_last_and_the_best(running_job) -> None:  # type: ignore[no-untyped-def]
    store_states = None
    best = checkpoint_job(running_job, store_states, accuracy=0.9)
    checkpoint_job(running_job, None, accuracy=0.5)
    for _ in range(3):
        checkpoint_job(running_job)
    last = checkpoint_job(running_job)

    kept = list(running_job.checkpoints.all())

    assert {c.pk for c in kept} == {best.pk, last.pk}
    folder = Path(last.path).parent
    assert sorted(p.name for p in folder.glob("ckpt-*")) == sorted(Path(c.path).name for c in kept)


def test_an_evaluation_that_sets_a_new_best_checkpoints_what_it_scored(running_job) -> None:  # type: ignore[no-untyped-def]
    point = evaluate_job(running_job)
    assert point is not None

    best = running_job.checkpoints.get(accuracy__isnull=False)

    assert best.accuracy == point.accuracy
    assert best.versions == point.versions
