"""Initial weights: a researcher's ``.npz`` is checked at submit and again, by hash and
against the built model, when the job starts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from downpour.training.actions.jobs import (
    JobRejected,
    export_job,
    start_job,
    start_queued_jobs,
    submit_job,
)
from downpour.training.models import Job
from downpour.training.store import job_store

from .helpers import job_form, mlp_config, npz_bytes
from .helpers import job_params as params

pytestmark = pytest.mark.django_db


def exported_weights(alice, dataset) -> tuple[dict[str, np.ndarray], bytes]:  # type: ignore[no-untyped-def]
    """A finished job's ``weights.npz``, after some training moved its weights."""
    job = submit_job(alice, dataset, params(name="first"))
    assert start_job(job)
    job.refresh_from_db()
    store = job_store(job)
    for shard, specs in enumerate(store.layout.shards):
        grad = {v.name: np.full(v.shape, 0.25, np.float32) for v in specs}
        store.push(shard, grad, 0, f"trained:0:{shard}")
    export_job(job)
    job.refresh_from_db()
    return store.weights(), Path(job.weights_path).read_bytes()


def test_a_job_carries_on_from_another_jobs_exported_weights(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    trained, download = exported_weights(alice, dataset)
    # Execute
    job = submit_job(alice, dataset, params(name="second", initial_weights=download))
    assert start_job(job)
    # Assert
    job.refresh_from_db()
    assert len(job.initial_weights_sha256) == 64
    started = job_store(job).weights()
    assert started.keys() == trained.keys()
    for name, value in trained.items():
        np.testing.assert_array_equal(started[name], value)


def _good(shapes_from_export: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.replace("/", "__"): v.copy() for k, v in shapes_from_export.items()}


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda a: {
                **a,
                "sequential__dense__kernel": a["sequential__dense__kernel"].astype(np.float64),
            },
            "float32",
        ),
        (
            lambda a: {
                **a,
                "sequential__dense__bias": np.full_like(a["sequential__dense__bias"], np.nan),
            },
            "NaN",
        ),
        (lambda a: {}, "no arrays"),
    ],
    ids=["float64", "nan", "empty"],
)
def test_weights_that_are_not_finite_float32_are_refused_at_submit_and_nothing_is_kept(
    alice, dataset, tamper, reason: str
) -> None:  # type: ignore[no-untyped-def]
    trained, _ = exported_weights(alice, dataset)
    bad = npz_bytes(**tamper(_good(trained)))
    before = Job.objects.count()
    with pytest.raises(JobRejected, match=reason):
        submit_job(alice, dataset, params(name="bad", initial_weights=bad))
    assert Job.objects.count() == before


def test_pickled_weights_are_refused_and_never_unpickled(alice, dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (canary,))

    buffer = io.BytesIO()
    np.savez(buffer, sequential__dense__kernel=np.array([Payload()], dtype=object))
    with pytest.raises(JobRejected, match="initial weights rejected"):
        submit_job(alice, dataset, params(initial_weights=buffer.getvalue()))
    assert not canary.exists()
    # The control: a loader that trusts the archive runs the gadget.
    np.load(io.BytesIO(buffer.getvalue()), allow_pickle=True)["sequential__dense__kernel"]
    assert canary.exists()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda a: {**a, "sequential__dense__kernel": np.zeros((8, 17), np.float32)}, "shape"),
        (lambda a: {k: v for k, v in a.items() if k != "sequential__dense_1__bias"}, "missing"),
        (lambda a: {**a, "extra__kernel": np.zeros(3, np.float32)}, "not in the model"),
    ],
    ids=["shape", "missing", "extra"],
)
def test_weights_that_do_not_fit_the_built_model_fail_the_job_at_start_with_the_reason(
    alice, dataset, tamper, reason: str
) -> None:  # type: ignore[no-untyped-def]
    trained, _ = exported_weights(alice, dataset)
    job = submit_job(
        alice, dataset, params(name="misfit", initial_weights=npz_bytes(**tamper(_good(trained))))
    )
    start_queued_jobs()
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert "initial weights" in job.status_message and reason in job.status_message


def test_weights_changed_on_disk_after_submit_fail_the_job(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    trained, download = exported_weights(alice, dataset)
    job = submit_job(alice, dataset, params(name="swapped", initial_weights=download))
    swapped = {k: -v for k, v in _good(trained).items()}
    Path(job.initial_weights_path).write_bytes(npz_bytes(**swapped))
    start_queued_jobs()
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and "SHA-256" in job.status_message


def test_the_job_form_takes_initial_weights_and_explains_a_refusal(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    trained, download = exported_weights(alice, dataset)
    client = Client()
    client.force_login(alice)
    form = job_form("from-upload", str(dataset.id), json.dumps(mlp_config()))
    ok = client.post(
        "/jobs/new/", {**form, "initial_weights": SimpleUploadedFile("w.npz", download)}
    )
    assert ok.status_code == 302, ok.content
    assert Job.objects.get(name="from-upload").initial_weights_sha256
    bad = npz_bytes(**{k: v.astype(np.float64) for k, v in _good(trained).items()})
    refused = client.post(
        "/jobs/new/",
        {
            **job_form("bad", str(dataset.id), json.dumps(mlp_config())),
            "initial_weights": SimpleUploadedFile("w.npz", bad),
        },
    )
    assert refused.status_code == 200 and b"float32" in refused.content
    assert not Job.objects.filter(name="bad").exists()
