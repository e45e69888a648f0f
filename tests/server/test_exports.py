"""The model you download is the one you saw: evaluated weights, compiled, no dead links."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from django.test import Client

from downpour.training.actions.evaluations import evaluate_job
from downpour.training.actions.jobs import Evaluated, finish_job, start_job, submit_job
from downpour.training.models import Evaluation, Job
from downpour.training.store import job_store

from .helpers import job_params

pytestmark = pytest.mark.django_db


@pytest.fixture
def running_job(alice, dataset):  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, job_params(target_accuracy=1.0))
    assert start_job(job)
    job.refresh_from_db()
    return job


def _constant_output(job: Job, cls: int) -> dict[str, np.ndarray]:
    """Weights whose model predicts class ``cls`` for every input."""
    weights = job_store(job).weights()
    kernel, bias = list(weights)[-2:]
    weights[kernel] = np.zeros_like(weights[kernel])
    weights[bias] = np.where(np.arange(weights[bias].size) == cls, 10.0, 0.0).astype(np.float32)
    return weights


def _test_split(job: Job) -> tuple[np.ndarray, np.ndarray]:
    with np.load(job.dataset.test_path, allow_pickle=False) as npz:
        return npz["x"].astype(np.float32), npz["y"]


def _keras_accuracy(path: str, x: np.ndarray, y: np.ndarray) -> float:
    import keras

    model = keras.models.load_model(path)
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    return float(results["accuracy"])


def test_it_exports_the_best_and_the_last_evaluated_weights_each_compiled_and_labelled(
    running_job,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the first evaluation predicts the commonest class, the last the rarest.
    x, y = _test_split(running_job)
    counts = np.bincount(y, minlength=3)
    present, absent = int(counts.argmax()), int(counts.argmin())
    assert counts[present] > counts[absent]
    store = job_store(running_job)
    store.initialize(_constant_output(running_job, present))
    first = evaluate_job(running_job)
    assert first is not None
    store.initialize(_constant_output(running_job, absent))
    Job.objects.filter(id=running_job.id).update(budget_samples=1, samples_done=1)
    running_job.refresh_from_db()
    # Execute
    last = evaluate_job(running_job)
    # Assert
    assert last is not None
    running_job.refresh_from_db()
    assert running_job.status == Job.Status.DONE
    assert last.accuracy < first.accuracy
    assert running_job.export_accuracy == pytest.approx(last.accuracy)
    assert running_job.best_export_accuracy == pytest.approx(first.accuracy)
    one_example = 1 / len(y)
    assert abs(_keras_accuracy(running_job.keras_path, x, y) - last.accuracy) <= one_example
    assert abs(_keras_accuracy(running_job.best_keras_path, x, y) - first.accuracy) <= one_example
    labels = {d["kind"]: d["percent"] for d in running_job.downloads()}
    assert labels["best-keras"] == f"{first.accuracy:.1%}"
    assert labels["keras"] == f"{last.accuracy:.1%}"


def test_the_exported_weights_are_the_evaluated_ones_not_those_after_later_pushes(
    running_job,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: an evaluation scores the store's weights, then a push lands before the export.
    store = job_store(running_job)
    evaluated = store.weights()
    layout = store.layout
    for shard, group in enumerate(layout.shards):
        grads = {spec.name: np.ones(spec.shape, np.float32) for spec in group}
        store.push(shard, grads, 0, f"later:{shard}")
    # Execute
    finish_job(running_job, Job.Status.DONE, "reached its target", Evaluated(evaluated, 0.5))
    # Assert
    running_job.refresh_from_db()
    with np.load(running_job.weights_path, allow_pickle=False) as npz:
        exported = {name: npz[key] for name, key in zip(evaluated, npz.files, strict=True)}
    for name, value in evaluated.items():
        np.testing.assert_array_equal(exported[name], value)
    assert running_job.export_accuracy == 0.5


def _page(alice, job: Job) -> str:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(alice)
    response = client.get(f"/jobs/{job.id}/")
    assert response.status_code == 200
    return response.content.decode()


def test_a_failed_job_offers_no_download_links(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a job that failed before it trained, and one whose export file is gone.
    failed = submit_job(alice, dataset, job_params())
    Job.objects.filter(id=failed.id).update(
        status=Job.Status.FAILED, status_message="could not start: boom"
    )
    failed.refresh_from_db()
    # Execute
    page = _page(alice, failed)
    # Assert
    assert "/download/" not in page
    assert "No model to download" in page
    client = Client()
    client.force_login(alice)
    assert client.get(f"/jobs/{failed.id}/download/keras/").status_code == 404


def test_a_link_is_offered_only_for_a_file_that_exists(alice, dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, job_params())
    kept = tmp_path / "weights.npz"
    kept.write_bytes(b"x")
    Job.objects.filter(id=job.id).update(
        status=Job.Status.FAILED,
        keras_path=str(tmp_path / "gone.keras"),
        weights_path=str(kept),
        export_accuracy=0.5,
    )
    job.refresh_from_db()
    page = _page(alice, job)
    assert f"/jobs/{job.id}/download/weights/" in page
    assert "/download/keras/" not in page
    assert Evaluation.objects.filter(job=job).count() == 0
