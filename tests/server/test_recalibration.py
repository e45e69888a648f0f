"""BatchNormalization statistics measured at the weights evaluation and export score.

The store's statistics are a running average of what agents measured at older weights; on
the digits Conv-BN CNN the download scored 1.4 points below the same weights with statistics
recalibrated from the training set (tests/e2e/test_statistics.py). Alice's job here is a
small MLP whose BatchNormalization sits right after a bias-free Dense layer, so the exact
statistics are those of ``x @ kernel``.
"""

from __future__ import annotations

import numpy as np
import pytest

from downpour.paramstore.checkpoint import read_checkpoint
from downpour.training.actions.evaluations import evaluate_job
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.actions.references import root_sample
from downpour.training.evaluation import recalibrate_statistics, recalibrated
from downpour.training.models import Job
from downpour.training.store import job_store

from .consumer.test_statistics import bn_mlp_json
from .helpers import job_params

pytestmark = pytest.mark.django_db


@pytest.fixture
def bn_job(alice, dataset):  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, job_params(model_json=bn_mlp_json(), target_accuracy=1.0))
    assert start_job(job)
    job.refresh_from_db()
    return job


def _names(job: Job) -> tuple[str, str, str]:
    """The Dense kernel's and the BatchNormalization mean's and variance's store names."""
    layout = job.shard_layout()
    kernel = next(name for name in job_store(job).weights() if name.endswith("kernel"))
    mean, variance = (spec.name for spec in layout.statistics)
    return kernel, mean, variance


def test_it_measures_the_exact_statistics_of_the_sample_over_several_batches(
    bn_job: Job,
) -> None:
    # Prepare: statistics far from the truth, as a lagging average might be.
    kernel, mean, variance = _names(bn_job)
    weights = job_store(bn_job).weights()
    weights[mean] = np.full(4, 50.0, np.float32)
    weights[variance] = np.full(4, 1e-3, np.float32)
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(100, 8)).astype(np.float32)
    # Execute: batches of 16 (the last one short), so the batch means differ.
    measured = recalibrate_statistics(bn_job, weights, x, batch_size=16)
    # Assert: the pooled variance, E[var_b] + Var[mean_b], is the whole sample's variance.
    activations = x.astype(np.float64) @ weights[kernel].astype(np.float64)
    np.testing.assert_allclose(measured[mean], activations.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(measured[variance], activations.var(axis=0), rtol=1e-3)
    assert weights[mean][0] == 50.0, "the caller's weights are not modified"
    np.testing.assert_array_equal(measured[kernel], weights[kernel])


def test_a_model_without_batch_normalization_comes_back_unchanged(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, job_params())
    assert start_job(job)
    weights = job_store(job).weights()
    assert recalibrated(job, weights) is weights


def test_evaluation_scores_and_checkpoints_statistics_measured_at_its_weights(
    bn_job: Job,
) -> None:
    # Prepare: the store's running average says something else entirely.
    kernel, mean, variance = _names(bn_job)
    store = job_store(bn_job)
    layout = store.layout
    state = store.statistics_state()
    assert state is not None
    bogus = {mean: np.full(4, 50.0, np.float32), variance: np.full(4, 1e-3, np.float32)}
    store.restore_statistics(type(state)(state.version, layout.flatten_statistics(bogus), 1.0))
    # Execute
    point = evaluate_job(bn_job)
    # Assert: the best checkpoint (what the best export is) holds the measured statistics.
    assert point is not None
    checkpoint = bn_job.checkpoints.get()
    saved = read_checkpoint(checkpoint.path, checkpoint.sha256).weights()
    x, _y = root_sample(bn_job, 2048)
    activations = x.astype(np.float64) @ saved[kernel].astype(np.float64)
    np.testing.assert_allclose(saved[mean], activations.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(saved[variance], activations.var(axis=0), rtol=1e-3)
