"""Alice submits and watches a Sandblaster job: the form, the action's checks, the page."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from downpour.training.actions.jobs import JobRejected, start_job, submit_job
from downpour.training.models import Job
from downpour.training.sandblaster import coordinate

from .helpers import job_form, job_params, mlp_config

pytestmark = pytest.mark.django_db


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def open_first_pass(alice: Any, dataset: Any, units: int) -> Job:
    """Alice's running Sandblaster job of ``units`` units a pass, its pass 0 opened."""
    job = submit_job(alice, dataset, job_params(algorithm="sandblaster", sandblaster_units=units))
    assert start_job(job)
    job.refresh_from_db()
    coordinate(job)
    return job


def test_the_form_explains_sandblaster_in_plain_words(alice: Any) -> None:
    page = logged_in(alice).get("/jobs/new/").content.decode()

    assert 'value="sandblaster"' in page
    assert "L-BFGS" in page and "split into many small pieces among the agents" in page
    assert "Pieces per pass" in page and "L-BFGS memory" in page


def test_alice_submits_a_sandblaster_job_from_the_form(alice: Any, dataset: Any) -> None:
    form = job_form(
        "blast",
        dataset.id,
        json.dumps(mlp_config()),
        algorithm="sandblaster",
        lbfgs_history=7,
        sandblaster_units=40,
    )

    response = logged_in(alice).post("/jobs/new/", form)

    assert response.status_code == 302, response.content.decode()[:2000]
    job = Job.objects.get(name="blast")
    assert (job.algorithm, job.lbfgs_history, job.sandblaster_units) == ("sandblaster", 7, 40)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"lbfgs_history": 0}, "1 to 100 pairs"),
        ({"sandblaster_units": 0}, "1 to 10000 work units"),
        ({"robust_aggregation": True}, "centred clipping"),
        ({"compression": "int8"}, "no compression"),
    ],
)
def test_submit_refuses_sandblaster_settings_that_make_no_sense(
    alice: Any, dataset: Any, overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(JobRejected, match=reason):
        submit_job(alice, dataset, job_params(algorithm="sandblaster", **overrides))


def test_the_job_page_shows_the_pass_units_line_search_and_backups(
    alice: Any, dataset: Any
) -> None:
    # Prepare: a started job whose coordinator opened its first pass
    job = open_first_pass(alice, dataset, units=6)
    Job.objects.filter(id=job.id).update(sandblaster_backups=2)

    # Execute
    page = logged_in(alice).get(f"/jobs/{job.id}/").content.decode()
    metrics = logged_in(alice).get(f"/jobs/{job.id}/metrics.json").json()

    # Assert
    assert "Sandblaster L-BFGS (history 10): pass 0, 0 of 6 units done" in page
    assert "evaluating the starting point" in page and "2 backup copies issued" in page
    assert metrics["sync"]["pass"] == 0 and metrics["sync"]["backups"] == 2


def test_a_coordinator_whose_store_moved_starts_lbfgs_again_in_a_new_pass(
    alice: Any, dataset: Any
) -> None:
    # Prepare: pass 0 open at version 0; then the store moves two versions on behind the
    # coordinator's back, as a restore from another checkpoint could leave it
    from downpour.paramstore import ShardState
    from downpour.training import sandblaster
    from downpour.training.models import WorkUnit
    from downpour.training.store import job_store

    job = open_first_pass(alice, dataset, units=4)
    store = job_store(job)
    for shard in range(len(store.layout.shards)):
        for version in (0, 1):
            state = store.storage.load(store.job_id, shard)
            assert state is not None
            moved = ShardState(version + 1, state.weights, state.accumulators, None)
            store.storage.commit(store.job_id, shard, version, moved, f"elsewhere:{version}")
    saved = sandblaster._load(sandblaster.pass_results(), str(job.id))
    assert saved is not None
    saved.version = 1  # the open pass is pinned to 1, the store already at 2
    sandblaster.pass_results().save_state(str(job.id), saved.to_bytes())

    # Execute
    coordinate(job)

    # Assert: a new pass 1 pinned at the store's version, and pass 0 retired
    job.refresh_from_db()
    assert job.sandblaster_progress["pass"] == 1
    assert job.sandblaster_progress["version"] == 2
    units = WorkUnit.objects.filter(job=job)
    assert set(units.filter(pass_number=1).values_list("pinned_version", flat=True)) == {2}
    assert not units.filter(pass_number=0, status="pending").exists()


def test_the_coordinator_task_frees_its_worker_at_once_when_no_sandblaster_job_runs() -> None:
    import time

    from downpour.training.sandblaster import coordinate_running_jobs

    started = time.monotonic()

    assert coordinate_running_jobs(budget_s=5.0) == 0
    assert time.monotonic() - started < 1.0


def answer_pass_by_hand(job: Job, gradient_value: float, loss: float = 0.5) -> None:
    """Keep an answer of every unit of the open pass in every shard, as agents would."""
    import numpy as np

    from downpour.paramstore.passes import UnitAnswer
    from downpour.training.models import WorkUnit
    from downpour.training.store import job_store, pass_results

    job.refresh_from_db()
    number = job.sandblaster_progress["pass"]
    layout = job_store(job).layout
    for unit in WorkUnit.objects.filter(job=job, pass_number=number):
        samples = unit.sample_stop - unit.sample_start
        for shard in range(len(layout.shards)):
            size = layout.shard_size(shard)
            gradient = np.full(size, gradient_value * samples, np.float32)
            answer = UnitAnswer(samples, loss, gradient)
            pass_results().offer(str(job.id), number, unit.pass_unit, shard, f"u{unit.id}", answer)


def test_a_job_whose_lbfgs_converged_is_finished_with_a_message(alice: Any, dataset: Any) -> None:
    # Prepare: pass 0 open, and its answers say the gradient is zero at the start
    job = open_first_pass(alice, dataset, units=2)
    answer_pass_by_hand(job, gradient_value=0.0)

    # Execute
    completed = coordinate(job)

    # Assert
    job.refresh_from_db()
    assert completed == 1
    assert job.status == Job.Status.DONE
    assert "L-BFGS converged" in job.status_message
    assert job.sandblaster_progress["line_search"] == "converged"


def test_a_coordinator_whose_lock_expired_mid_turn_writes_nothing_and_does_not_fail(
    alice: Any, dataset: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: pass 0 answered; while the turn sums it, its lock expires and another worker
    # takes it over
    from django.conf import settings

    from downpour.training import sandblaster
    from downpour.training.store import storage

    client = getattr(storage(), "client", None)
    if client is None:
        pytest.skip("the coordinator lock crosses processes only in Redis")
    job = open_first_pass(alice, dataset, units=2)
    answer_pass_by_hand(job, gradient_value=0.5)
    key = f"{settings.STORE_PREFIX}coordinator:{job.id}"
    real_assemble = sandblaster.assemble

    def slow_assemble(*args: Any) -> Any:
        client.delete(key)
        client.set(key, "another-worker")
        return real_assemble(*args)

    monkeypatch.setattr(sandblaster, "assemble", slow_assemble)

    # Execute
    completed = coordinate(job)

    # Assert: the other worker's lock stands and this turn moved nothing on
    job.refresh_from_db()
    assert completed == 0
    assert job.sandblaster_progress["pass"] == 0
    assert client.get(key) == b"another-worker"


def test_a_coordinator_that_lost_its_state_opens_a_new_pass_number_at_the_stores_version(
    alice: Any, dataset: Any
) -> None:
    # Prepare: pass 0 finished, pass 1 open at version 1; then the saved state is lost
    from downpour.training.models import WorkUnit
    from downpour.training.store import pass_results

    job = open_first_pass(alice, dataset, units=2)
    answer_pass_by_hand(job, gradient_value=0.5)
    assert coordinate(job) == 1
    pass_results().delete(str(job.id))

    # Execute
    coordinate(job)

    # Assert: pass 2 at the store's version 1, and no older unit is handed out again
    job.refresh_from_db()
    assert job.sandblaster_progress["pass"] == 2
    units = WorkUnit.objects.filter(job=job)
    assert set(units.filter(pass_number=2).values_list("pinned_version", flat=True)) == {1}
    assert not units.filter(pass_number__lt=2, status="pending").exists()


def test_a_restore_never_requeues_a_finished_sandblaster_pass(alice: Any, dataset: Any) -> None:
    # Prepare: pass 0 finished (its units done); then the store is lost
    from downpour.training.actions.recovery import restore_store
    from downpour.training.models import WorkUnit
    from downpour.training.store import forget_job_store, job_store

    job = open_first_pass(alice, dataset, units=2)
    answer_pass_by_hand(job, gradient_value=0.5)
    assert coordinate(job) == 1
    job_store(job).delete()
    forget_job_store(str(job.id))

    # Execute
    assert restore_store(job, from_initial_weights=True)

    # Assert
    assert not WorkUnit.objects.filter(job=job, pass_number=0, status="pending").exists()


def test_a_done_unit_of_the_open_pass_without_its_answers_is_requeued(
    alice: Any, dataset: Any
) -> None:
    # Prepare: pass 0's units marked done, but none was answered
    from downpour.training.models import WorkUnit

    job = open_first_pass(alice, dataset, units=2)
    WorkUnit.objects.filter(job=job).update(status="done")

    # Execute
    coordinate(job)

    # Assert
    assert set(WorkUnit.objects.filter(job=job).values_list("status", flat=True)) == {"pending"}


def test_a_finished_pass_ends_its_stragglers_leases(alice: Any, dataset: Any, agent: Any) -> None:
    # Prepare: a unit of pass 0 leased (a straggler) while the pass is answered elsewhere
    from datetime import timedelta

    from django.utils import timezone

    from downpour.training.models import Lease, WorkUnit

    job = open_first_pass(alice, dataset, units=2)
    unit = WorkUnit.objects.filter(job=job, pass_number=0).first()
    assert unit is not None
    WorkUnit.objects.filter(id=unit.id).update(status="leased")
    straggler = Lease.objects.create(
        unit=unit, agent=agent, expires_at=timezone.now() + timedelta(seconds=60)
    )
    answer_pass_by_hand(job, gradient_value=0.5)

    # Execute
    assert coordinate(job) == 1

    # Assert
    straggler.refresh_from_db()
    assert straggler.status == Lease.Status.SUPERSEDED
