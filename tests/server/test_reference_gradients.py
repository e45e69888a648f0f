"""Robust jobs warm up on the server's own reference gradients (FLTrust), no trusted agent.

Alice's robust job, Charlie's ordinary agent; nobody has a trusted token. Real database and
store (PostgreSQL and Redis when they run); TensorFlow in process, as in a worker.
"""

from __future__ import annotations

import numpy as np
import pytest

from downpour.donors.models import Agent, AgentToken
from downpour.training import store as job_stores
from downpour.training.actions.claims import claim_work
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.actions.references import push_running_references, root_sample
from downpour.training.store import job_store

from .helpers import job_params

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _read_the_store_on_every_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_stores, "WARMUP_TTL_S", 0.0)


@pytest.fixture
def ordinary(charlie):  # type: ignore[no-untyped-def]
    token, _ = AgentToken.issue(charlie, "pc")
    return Agent.objects.create(token=token, name="charlie-pc", samples_per_s=1000.0)


@pytest.fixture
def robust_job(alice, dataset):  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, job_params(robust_aggregation=True))
    assert start_job(job)
    job.refresh_from_db()
    return job


def test_an_ordinary_agent_gets_work_once_the_server_has_pushed_its_references(
    robust_job, ordinary
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a fresh robust job holds untrusted agents back.
    assert claim_work(ordinary) is None
    before = job_store(robust_job).weights()
    # Execute
    applied = push_running_references()
    # Assert
    status = job_store(robust_job).warmup_status()
    assert status is not None and status.warm
    assert applied == 10 * robust_job.n_param_shards
    assert claim_work(ordinary) is not None
    after = job_store(robust_job).weights()
    assert any(not np.array_equal(before[name], after[name]) for name in before)


def test_a_warm_job_gets_one_reference_push_per_shard_per_round(robust_job) -> None:  # type: ignore[no-untyped-def]
    push_running_references()
    versions = job_store(robust_job).versions()
    push_running_references()
    assert job_store(robust_job).versions() == [v + 1 for v in versions]


def test_the_root_sample_is_fixed_by_the_jobs_seed(robust_job) -> None:  # type: ignore[no-untyped-def]
    x1, y1 = root_sample(robust_job, 16)
    x2, y2 = root_sample(robust_job, 16)
    assert x1.shape[0] == 16
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert root_sample(robust_job, 10_000)[0].shape[0] == robust_job.dataset.n_train
