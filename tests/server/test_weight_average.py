"""A Downpour job's average of the weights: what the researcher sets, what is scored, what
is checkpointed and restored, what is downloaded; out of range is refused, other
algorithms ignore it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from downpour.paramstore import read_checkpoint
from downpour.training import evaluation
from downpour.training.actions.evaluations import evaluate_job
from downpour.training.actions.jobs import JobRejected, export_job, start_job, submit_job
from downpour.training.actions.recovery import ensure_store_ready
from downpour.training.models import Job
from downpour.training.store import job_store

from .helpers import client_of, job_form, job_params, mlp_config

pytestmark = pytest.mark.django_db


def started(alice: Any, dataset: Any, **overrides: Any) -> Job:
    job = submit_job(alice, dataset, job_params(target_accuracy=1.0, **overrides))
    assert start_job(job)
    job.refresh_from_db()
    return job


def push_a_few(job: Job, n: int = 4) -> None:
    store = job_store(job)
    for k in range(n):
        for shard, specs in enumerate(store.layout.shards):
            grad = {s.name: np.full(s.shape, 0.1 * (k + 1), np.float32) for s in specs}
            store.push(shard, grad, store.versions()[shard], f"lease:{k}:{shard}")


def test_the_job_is_scored_checkpointed_and_exported_at_the_average(
    alice: Any, dataset: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a Downpour job averaging over about the last two versions, four pushes in.
    job = started(alice, dataset, weight_average=0.5)
    store = job_store(job)
    assert store.average == 0.5 and job.store_bytes == job.param_count * 4 * 3
    push_a_few(job)
    averaged, raw = store.scored_weights(), store.weights()
    assert any(not np.allclose(averaged[k], raw[k]) for k in raw)
    seen: list[dict[str, np.ndarray]] = []
    score = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda j, w: seen.append(w) or score(j, w))

    # Execute: an evaluation (a first one is always a new best, so it checkpoints).
    point = evaluate_job(job)

    # Assert: scored at the average; the checkpoint holds it beside the weights.
    assert point is not None and len(seen) == 1
    for name, value in averaged.items():
        np.testing.assert_array_equal(seen[0][name], value)
    checkpoint = job.checkpoints.get()
    saved = read_checkpoint(checkpoint.path, checkpoint.sha256)
    for shard, state in enumerate(store.snapshot()):
        assert saved.states[shard].average is not None
        np.testing.assert_array_equal(saved.states[shard].average, state.average)
        np.testing.assert_array_equal(saved.states[shard].weights, state.weights)
    # The download is the average too.
    export_job(job)
    job.refresh_from_db()
    with np.load(job.weights_path, allow_pickle=False) as npz:  # in the layout's order
        exported = {name: npz[key] for name, key in zip(averaged, npz.files, strict=True)}
    for name, value in averaged.items():
        np.testing.assert_array_equal(exported[name], value)


def test_a_store_lost_and_restored_keeps_its_average(alice: Any, dataset: Any) -> None:
    job = started(alice, dataset, weight_average=0.9)
    push_a_few(job)
    evaluate_job(job)  # checkpoints the state it scored
    store = job_store(job)
    before = [state.average.copy() for state in store.snapshot() if state.average is not None]
    assert len(before) == store.layout.n_shards

    store.delete()  # Redis lost the job
    ensure_store_ready(job)

    for shard, state in enumerate(store.snapshot()):
        assert state.average is not None
        np.testing.assert_array_equal(state.average, before[shard])


@pytest.mark.parametrize("algorithm", ["local-steps", "sync"])
def test_other_algorithms_ignore_the_average(alice: Any, dataset: Any, algorithm: str) -> None:
    job = started(alice, dataset, weight_average=0.99, algorithm=algorithm)
    assert not job.averaged and job.store_bytes == job.param_count * 4 * 2
    store = job_store(job)
    assert store.average == 0.0
    assert all(state.average is None for state in store.snapshot())


@pytest.mark.parametrize("value", [-0.1, 1.0, 2.0])
def test_an_average_out_of_range_is_refused_by_the_form_and_the_actions(
    alice: Any, dataset: Any, value: float
) -> None:
    form = job_form("avg", str(dataset.id), json.dumps(mlp_config()), weight_average=value)
    response = client_of(alice).post("/jobs/new/", form)
    assert response.status_code == 200 and "weight_average" in response.context["form"].errors
    with pytest.raises(JobRejected, match="weight average"):
        submit_job(alice, dataset, job_params(weight_average=value))
    assert not Job.objects.exists()


def test_the_form_makes_the_job_and_running_it_again_keeps_its_average(
    alice: Any, dataset: Any
) -> None:
    client = client_of(alice)
    form = job_form("avg", str(dataset.id), json.dumps(mlp_config()), weight_average=0.99)
    assert client.post("/jobs/new/", form).status_code == 302
    job = Job.objects.get(name="avg")
    assert job.weight_average == 0.99 and job.averaged

    page = client.get(f"/jobs/new/?from={job.id}").content.decode()

    assert 'name="weight_average" value="0.99"' in page
    # The job's page says what its accuracy is of.
    shown = client.get(f"/jobs/{job.id}/").content.decode()
    assert "the running average of the weights (b = 0.99)" in shown
    # Left empty, the field means off, as its help says.
    blank = job_form("blank", str(dataset.id), json.dumps(mlp_config()), weight_average="")
    assert client.post("/jobs/new/", blank).status_code == 302
    blank_job = Job.objects.get(name="blank")
    assert blank_job.weight_average == 0.0
    shown = client.get(f"/jobs/{blank_job.id}/").content.decode()
    assert '<td id="weight-average" colspan="3">the weights</td>' in shown
