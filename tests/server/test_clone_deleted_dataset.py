"""Alice clones a job whose dataset is deleted before she submits the clone (issue 9).

A job's dataset cannot be deleted while a job refers to it, so the clone's dataset goes in
another tab: Alice opens "run again" on her job, then deletes the job and its dataset, then
submits the form she had open. She gets a clear error; nothing is half-created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from downpour.portal.views import CLONED_FIELDS
from downpour.training.actions.control import delete_dataset, delete_job
from downpour.training.actions.jobs import JobRejected, submit_job
from downpour.training.models import Dataset, Job

from .helpers import job_params

pytestmark = pytest.mark.django_db


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def the_clone_form_as_posted(job: Job) -> dict[str, Any]:
    """What the browser posts for the clone form of ``job``, untouched by Alice."""
    fields = {name: getattr(job, name) for name in CLONED_FIELDS}
    data = {k: ("" if v is None else v) for k, v in fields.items() if not isinstance(v, bool)}
    data |= {k: "on" for k, v in fields.items() if v is True}  # unchecked boxes are absent
    return data | {
        "name": f"{job.name} (again)",
        "dataset": str(job.dataset_id),
        "model_json": json.dumps(job.model_config),
    }


def files_under(folder: str) -> set[Path]:
    root = Path(settings.MEDIA_ROOT) / folder
    return set(root.rglob("*")) if root.exists() else set()


def test_a_clone_whose_dataset_was_deleted_gets_a_clear_error_and_creates_nothing(
    alice: Any, dataset: Dataset
) -> None:
    # Prepare: Alice's finished job, its clone form open in one tab...
    job = submit_job(alice, dataset, job_params())
    client = logged_in(alice)
    page = client.get(f"/jobs/new/?from={job.id}").content.decode()
    assert f'value="{dataset.id}" selected' in page
    posted = the_clone_form_as_posted(job)
    # ...and the job and the dataset deleted in another.
    delete_job(job, alice)
    delete_dataset(dataset)
    jobs_files = files_under("jobs")
    # Execute
    response = client.post("/jobs/new/", posted)
    # Assert
    assert response.status_code == 200
    assert (
        "that dataset is not one of yours (it was deleted, or never was)"
        in response.content.decode()
    )
    assert not Job.objects.exists()
    assert files_under("jobs") == jobs_files


def test_a_dataset_deleted_after_the_form_was_checked_is_refused_not_a_500(
    alice: Any, dataset: Dataset
) -> None:
    # Prepare: the form validated against the dataset; then it was deleted.
    stale = Dataset.objects.get(id=dataset.id)
    delete_dataset(dataset)
    jobs_files = files_under("jobs")
    # Execute / Assert
    with pytest.raises(JobRejected, match="was deleted"):
        submit_job(alice, stale, job_params())
    assert not Job.objects.exists()
    assert files_under("jobs") == jobs_files
