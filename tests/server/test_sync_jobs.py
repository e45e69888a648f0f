"""Alice submits and watches a synchronous job: the form, the action's checks, the page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from django.test import Client

from downpour.paramstore.memory import InMemoryStorage
from downpour.training import store
from downpour.training.actions.jobs import JobRejected, start_job, submit_job
from downpour.training.actions.sync_steps import tick_sync_jobs
from downpour.training.models import Job

from .helpers import job_form, job_params, mlp_config

pytestmark = pytest.mark.django_db


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_form_offers_downpour_local_steps_sync_and_sandblaster_in_plain_words(
    alice: Any,
) -> None:
    page = logged_in(alice).get("/jobs/new/").content.decode()

    assert 'value="downpour"' in page and 'value="sync"' in page
    assert 'value="local-steps"' in page
    assert "first N agents" in page
    assert 'value="sandblaster"' in page


def test_alice_submits_a_sync_job_from_the_form(alice: Any, dataset: Any) -> None:
    form = job_form(
        "sync",
        dataset.id,
        json.dumps(mlp_config()),
        algorithm="sync",
        sync_workers=3,
        sync_backups=2,
        sync_step_timeout_s=4.5,
    )

    response = logged_in(alice).post("/jobs/new/", form)

    assert response.status_code == 302, response.content
    job = Job.objects.get(name="sync")
    assert (job.algorithm, job.sync_workers, job.sync_backups, job.sync_step_timeout_s) == (
        "sync",
        3,
        2,
        4.5,
    )


def test_the_form_asks_to_untick_centred_clipping_for_a_sync_job(alice: Any, dataset: Any) -> None:
    form = job_form(
        "both", dataset.id, json.dumps(mlp_config()), algorithm="sync", robust_aggregation="on"
    )

    response = logged_in(alice).post("/jobs/new/", form)

    assert response.status_code == 200
    assert "centred clipping works with Downpour only" in response.content.decode()
    assert not Job.objects.filter(name="both").exists()


def test_a_job_without_a_mode_is_downpour(alice: Any, dataset: Any) -> None:
    response = logged_in(alice).post(
        "/jobs/new/", job_form("plain", dataset.id, json.dumps(mlp_config()))
    )

    assert response.status_code == 302
    assert Job.objects.get(name="plain").algorithm == "downpour"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            {"algorithm": "lbfgs"},
            "algorithm must be one of downpour, local-steps, sync, sandblaster",
        ),
        ({"algorithm": "sync", "sync_workers": 0}, "1 to 64 agents"),
        ({"algorithm": "sync", "sync_backups": -1}, "backup agents"),
        ({"algorithm": "sync", "sync_step_timeout_s": 0.0}, "step timeout"),
        ({"algorithm": "sync", "robust_aggregation": True}, "centred clipping"),
    ],
)
def test_submit_refuses_a_mode_that_does_not_exist_or_makes_no_sense(
    alice: Any, dataset: Any, overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(JobRejected, match=reason):
        submit_job(alice, dataset, job_params(**overrides))


def test_the_job_page_shows_the_step_late_gradients_and_timeouts(
    alice: Any, dataset: Any, settings: Any
) -> None:
    settings.REDIS_URL = ""
    store.storage.cache_clear()
    job = submit_job(alice, dataset, job_params(algorithm="sync", sync_workers=1, sync_backups=1))
    assert start_job(job)
    job.refresh_from_db()
    sync = store.job_sync(job)
    assert sync is not None
    layout = sync.store.layout
    grads = {s.name: np.full(s.shape, 0.1, np.float32) for s in layout.shards[0]}
    sync.push(0, grads, 0, "a:0:0", "a", 30)
    sync.push(0, grads, 0, "b:0:0", "b", 30)  # the step had its one gradient: late

    page = logged_in(alice).get(f"/jobs/{job.id}/").content.decode()
    metrics = logged_in(alice).get(f"/jobs/{job.id}/metrics.json").json()

    assert "synchronous, first 1 of 2 agents per step: step 1" in page
    assert "1 late gradients dropped" in page and "0 steps applied by the 10 s timeout" in page
    assert metrics["sync"]["step"] == 1 and metrics["sync"]["late"] == 1
    store.forget_job_store(str(job.id))
    store.storage.cache_clear()


@pytest.fixture
def clock(settings: Any) -> Iterator[list[float]]:
    """The embedded store (in memory), its steps' clock set by the test: ``clock[0]`` s."""
    settings.REDIS_URL = ""
    store.storage.cache_clear()
    now = [1000.0]
    storage = store.storage()
    assert isinstance(storage, InMemoryStorage)
    storage._clock = lambda: now[0]  # the simulator's hook (InMemoryStorage(clock=...))
    try:
        yield now
    finally:
        for job_id in list(store._stores):
            store.forget_job_store(job_id)
        store.storage.cache_clear()


def test_beat_applies_a_timed_out_step_that_no_push_or_waiting_fetch_will(
    alice: Any, dataset: Any, clock: list[float]
) -> None:
    # A step of N = 2 got one gradient, then its agents stopped (their leases ended): no
    # push fills it and no fetch waits for it. The counted (and credited) gradient must
    # still reach the weights once the step's timeout has passed, and only once.
    job = submit_job(
        alice,
        dataset,
        job_params(algorithm="sync", sync_workers=2, sync_backups=0, sync_step_timeout_s=30),
    )
    assert start_job(job)
    job.refresh_from_db()
    sync = store.job_sync(job)
    assert sync is not None
    shards = len(sync.store.layout.shards)
    for shard, specs in enumerate(sync.store.layout.shards):
        grads = {s.name: np.full(s.shape, 0.1, np.float32) for s in specs}
        sync.push(shard, grads, 0, f"a:0:{shard}", "a", 30)

    clock[0] += 29.9
    early = tick_sync_jobs()  # the step is younger than its timeout
    versions_early = sync.store.versions()
    clock[0] += 0.2
    applied = tick_sync_jobs()
    again = tick_sync_jobs()

    assert early == 0 and versions_early == [0] * shards
    assert applied == shards and again == 0
    assert sync.store.versions() == [1] * shards
    assert sync.counts().steps == 1 and sync.counts().timeouts == 1


def test_beat_leaves_other_jobs_alone(alice: Any, dataset: Any, clock: list[float]) -> None:
    job = submit_job(alice, dataset, job_params())
    assert start_job(job)
    job.refresh_from_db()
    before = store.job_store(job).versions()
    clock[0] += 3600

    assert tick_sync_jobs() == 0
    assert store.job_store(job).versions() == before
