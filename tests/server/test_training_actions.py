"""The training actions against the configured database and store (PostgreSQL + Redis in CI)."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from downpour.donors.models import Agent, AgentToken
from downpour.scheduler.reputation import PushFlags
from downpour.training.actions.bans import lift_ban, record_clipping, record_spot_check
from downpour.training.actions.claims import claim_work
from downpour.training.actions.contributions import record_contribution
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.evaluations import evaluate_job
from downpour.training.actions.jobs import JobRejected, start_job, submit_job
from downpour.training.actions.leases import (
    LeaseError,
    complete_lease,
    get_agent_lease,
    heartbeat,
    lease_message,
    reap_expired_leases,
    resume_lease,
    return_lease,
)
from downpour.training.actions.recovery import checkpoint_job, ensure_store_ready
from downpour.training.models import Job, Lease, WorkUnit
from downpour.training.queries import staleness_summary
from downpour.training.store import job_store

from .helpers import job_params as params
from .helpers import mlp_config, npz_upload, small_dataset

pytestmark = pytest.mark.django_db


@pytest.fixture
def running_job(alice, dataset):  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, params())
    assert start_job(job)
    job.refresh_from_db()
    return job


def pushed_in_full(lease: Lease) -> int:
    """Record what the consumer would for a lease whose every round arrived (and no spot
    check pending); returns the samples its ``complete`` claims."""
    unit = lease.unit
    size = int(unit.steps * min(unit.job.batch_size, unit.shard.n_samples))
    Lease.objects.filter(id=lease.id).update(samples_pushed=size, spot_check_round=None)
    return size


def test_it_queues_a_valid_job_with_its_parameter_count(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, params())
    assert job.status == Job.Status.QUEUED
    assert job.param_count == 8 * 16 + 16 + 16 * 3 + 3


def test_it_rejects_a_lambda_layer_naming_it(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    config = mlp_config()
    config["config"]["layers"][1]["class_name"] = "Lambda"
    with pytest.raises(JobRejected, match="Lambda"):
        submit_job(alice, dataset, params(model_json=config))
    assert Job.objects.count() == 0


def test_it_rejects_a_model_whose_input_does_not_fit_the_data(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(JobRejected, match=r"inputs of shape \[5\]"):
        submit_job(alice, dataset, params(model_json=mlp_config(inputs=5)))


def test_it_rejects_too_few_outputs_for_the_classes(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(JobRejected, match="2 outputs but the dataset has 3 classes"):
        submit_job(alice, dataset, params(model_json=mlp_config(classes=2)))


def test_it_needs_a_target_or_a_budget(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(JobRejected, match="target accuracy or a budget"):
        submit_job(alice, dataset, params(target_accuracy=None))


def test_it_rejects_garbage_json(alice, dataset) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(JobRejected, match="model rejected"):
        submit_job(alice, dataset, params(model_json="{nope"))


def test_starting_a_job_writes_its_initial_weights_to_the_store(running_job) -> None:  # type: ignore[no-untyped-def]
    assert running_job.status == Job.Status.RUNNING
    store = job_store(running_job)
    assert store.versions() == [0, 0]
    weights = store.weights()
    assert sum(w.size for w in weights.values()) == running_job.param_count
    assert not start_job(running_job), "a job starts once"


def test_claim_work_leases_a_unit_and_describes_it_in_a_lease_message(running_job, agent) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(agent)
    assert lease is not None and lease.unit.status == WorkUnit.Status.LEASED
    message = lease_message(lease)
    assert message["job_id"] == str(running_job.id)
    assert [v["name"] for shard in message["layout"] for v in shard]
    assert message["dataset"]["sha256"] == lease.unit.shard.sha256
    json.dumps(message)  # it must travel as JSON


def test_an_expired_lease_is_reaped_and_its_unit_reissued(running_job, agent, charlie) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(agent)
    assert lease is not None
    Lease.objects.filter(id=lease.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert reap_expired_leases() == 1
    assert reap_expired_leases() == 0, "reaping twice changes nothing"
    token, _ = AgentToken.issue(charlie, "other")
    other = Agent.objects.create(token=token, name="pc-2")
    again = claim_work(other)
    assert again is not None and again.unit_id == lease.unit_id
    assert WorkUnit.objects.get(id=lease.unit_id).attempts == 2
    with pytest.raises(LeaseError) as err:
        heartbeat(agent, str(lease.id))
    assert err.value.code == "lease_expired"


def test_reissued_units_go_out_in_the_order_their_leases_expired_not_the_order_they_were_made(
    running_job, agent, charlie
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two agents hold an older and a newer unit; the newer one's lease expires first.
    token, _ = AgentToken.issue(charlie, "other")
    other = Agent.objects.create(token=token, name="pc-2", samples_per_s=1000.0)
    older, newer = claim_work(agent), claim_work(other)
    assert older is not None and newer is not None
    assert older.unit.created_at < newer.unit.created_at
    past = timezone.now() - timedelta(seconds=1)
    Lease.objects.filter(id=newer.id).update(expires_at=past)
    assert reap_expired_leases() == 1
    Lease.objects.filter(id=older.id).update(expires_at=past)
    assert reap_expired_leases() == 1
    # Execute: the next two agents to ask.
    first = claim_work(Agent.objects.create(token=token, name="pc-3"))
    second = claim_work(Agent.objects.create(token=token, name="pc-4"))
    # Assert: the unit that waited longest goes first (during churn, ordering by creation
    # let older units that kept coming back pass a newer one again and again).
    assert first is not None and first.unit_id == newer.unit_id
    assert second is not None and second.unit_id == older.unit_id


def test_heartbeats_extend_a_lease_and_foreign_leases_are_refused(
    running_job, agent, charlie
) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(agent)
    assert lease is not None
    assert heartbeat(agent, str(lease.id)) is not None
    token, _ = AgentToken.issue(charlie, "other")
    stranger = Agent.objects.create(token=token, name="pc-2")
    with pytest.raises(LeaseError) as err:
        complete_lease(stranger, str(lease.id), 10)
    assert err.value.code == "lease_not_yours"


def test_a_returned_lease_puts_its_unit_back(running_job, agent) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(agent)
    assert lease is not None
    return_lease(agent, str(lease.id))
    assert Lease.objects.get(id=lease.id).status == Lease.Status.RETURNED
    assert WorkUnit.objects.get(id=lease.unit_id).status == WorkUnit.Status.PENDING


def test_a_completed_lease_finishes_its_unit(running_job, agent) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(agent)
    assert lease is not None
    complete_lease(agent, str(lease.id), pushed_in_full(lease))
    assert WorkUnit.objects.get(id=lease.unit_id).status == WorkUnit.Status.DONE
    agent.refresh_from_db()
    assert agent.leases_completed == 1


def test_checkpoint_and_restore_bring_back_the_exact_state(running_job) -> None:  # type: ignore[no-untyped-def]
    store = job_store(running_job)
    name = store.layout.shards[0][0].name
    grad = {v.name: np.full(v.shape, 0.5, np.float32) for v in store.layout.shards[0]}
    store.push(0, grad, 0, "lease:0:0")
    before = store.weights()
    checkpoint_job(running_job)
    store.delete()
    ensure_store_ready(running_job)
    after = store.weights()
    np.testing.assert_array_equal(before[name], after[name])
    assert store.versions()[0] == 1


def test_evaluation_records_a_point_and_finishes_the_job_at_its_target(running_job) -> None:  # type: ignore[no-untyped-def]
    Job.objects.filter(id=running_job.id).update(target_accuracy=0.0001)
    running_job.refresh_from_db()
    point = evaluate_job(running_job)
    assert point is not None and 0.0 <= point.accuracy <= 1.0
    running_job.refresh_from_db()
    assert running_job.status == Job.Status.DONE
    assert running_job.keras_path and running_job.weights_path
    with np.load(running_job.weights_path, allow_pickle=False) as npz:
        assert sum(npz[k].size for k in npz.files) == running_job.param_count


def test_an_evaluation_is_stamped_when_its_weights_were_read_not_once_scored(
    running_job, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a job started 10 s ago with 640 samples done, and a model that takes 1.5 s to
    # score, during which 9,000 more samples arrive.
    from downpour.training import evaluation

    started = timezone.now() - timedelta(seconds=10)
    Job.objects.filter(id=running_job.id).update(started_at=started, samples_done=640)
    running_job.refresh_from_db()
    score = evaluation.evaluate

    def slow_score(job, weights):  # type: ignore[no-untyped-def]
        Job.objects.filter(id=job.id).update(samples_done=9640)
        time.sleep(1.5)
        return score(job, weights)

    monkeypatch.setattr(evaluation, "evaluate", slow_score)
    # Execute
    point = evaluate_job(running_job)
    # Assert: the point is the weights' time and samples, not the scoring's end
    assert point is not None
    assert 10.0 <= point.elapsed_s < 11.4, point.elapsed_s
    assert point.samples == 640


def test_a_reconnected_agent_resumes_its_live_lease(running_job, agent) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(agent)
    assert lease is not None
    resumed = resume_lease(agent, str(lease.id))
    assert resumed.id == lease.id and resumed.resumed == 1
    assert resumed.expires_at >= lease.expires_at


def test_a_lease_cannot_be_resumed_by_another_agent_or_after_it_expired(
    running_job, agent, charlie
) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(agent)
    assert lease is not None
    token, _ = AgentToken.issue(charlie, "other")
    stranger = Agent.objects.create(token=token, name="pc-2")
    with pytest.raises(LeaseError) as err:
        resume_lease(stranger, str(lease.id))
    assert err.value.code == "lease_not_yours"
    Lease.objects.filter(id=lease.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(LeaseError) as err:
        resume_lease(agent, str(lease.id))
    assert err.value.code == "lease_expired"


def test_an_agent_that_abandons_work_gets_smaller_units_and_earns_them_back(
    running_job, agent
) -> None:  # type: ignore[no-untyped-def]
    first = claim_work(agent)
    assert first is not None
    Lease.objects.filter(id=first.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    reap_expired_leases()
    agent.refresh_from_db()
    assert agent.leases_abandoned == 1 and agent.unit_scale == 0.5
    WorkUnit.objects.filter(id=first.unit_id).update(status=WorkUnit.Status.DONE)
    second = claim_work(agent)
    assert second is not None
    assert second.unit.steps < first.unit.steps
    complete_lease(agent, str(second.id), pushed_in_full(second))
    agent.refresh_from_db()
    assert agent.unit_scale == 1.0 and agent.consecutive_completed == 1


def test_warm_start_keeps_a_second_agent_out_until_k_pushes(alice, dataset, agent, charlie) -> None:  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, params(warm_start_pushes=5))
    assert start_job(job)
    token, _ = AgentToken.issue(charlie, "other")
    second = Agent.objects.create(token=token, name="pc-2", samples_per_s=1000.0)
    assert claim_work(agent) is not None
    assert claim_work(second) is None
    Job.objects.filter(id=job.id).update(pushes_accepted=5)
    assert claim_work(second) is not None


def test_donated_compute_goes_to_the_researcher_furthest_below_their_weighted_share(
    alice, bob, dataset, agent
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: Alice's job has had 1,000 recent samples; Bob (weight 2) has had 1,500.
    alices = submit_job(alice, dataset, params(name="a"))
    bob_data = create_dataset(bob, "b", npz_upload(**small_dataset()), n_shards=1)
    bobs = submit_job(bob, bob_data, params(name="b"))
    bob.share_weight = 2.0
    bob.save()
    for job, samples in ((alices, 1000), (bobs, 1500)):
        assert start_job(job)
        unit = WorkUnit.objects.create(
            job=job,
            shard=job.dataset.shards.first(),
            steps=1,
            seed=0,
            status=WorkUnit.Status.DONE,
        )
        Lease.objects.create(
            unit=unit,
            agent=agent,
            status=Lease.Status.COMPLETED,
            samples=samples,
            expires_at=timezone.now(),
            ended_at=timezone.now(),
        )
    # Execute
    lease = claim_work(agent)
    # Assert: 1,500 / 2 < 1,000 / 1, so Bob's job gets the unit.
    assert lease is not None and lease.unit.job_id == bobs.id


def test_pushes_staleness_is_merged_into_the_jobs_distribution(running_job, agent) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(agent)
    assert lease is not None
    record_contribution(
        str(running_job.id), str(agent.id), str(lease.id), 64, 3, 0, 40.0, {0: 2, 3: 1}
    )
    record_contribution(str(running_job.id), str(agent.id), str(lease.id), 32, 1, 0, 20.0, {3: 1})
    running_job.refresh_from_db()
    assert running_job.staleness_hist == {"0": 2, "3": 2}
    summary = staleness_summary(running_job)
    assert summary["pushes"] == 4 and summary["p95"] == 3


def test_a_straggling_unit_near_the_end_of_a_job_gets_a_backup_and_the_first_copy_wins(
    alice, dataset, agent, charlie
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a job with a budget, almost all of it done, and one slow running unit.
    job = submit_job(alice, dataset, params(target_accuracy=None, budget_samples=10_000))
    assert start_job(job)
    slow = claim_work(agent)
    assert slow is not None
    Job.objects.filter(id=job.id).update(samples_done=10_000 - 1)
    Lease.objects.filter(id=slow.id).update(issued_at=timezone.now() - timedelta(hours=1))
    token, _ = AgentToken.issue(charlie, "fast")
    fast = Agent.objects.create(
        token=token,
        name="fast",
        samples_per_s=50_000.0,
        leases_completed=10,
        consecutive_completed=10,
    )
    # Execute
    backup = claim_work(fast)
    # Assert: the backup copies the straggler; the first to complete wins.
    assert backup is not None and backup.unit_id == slow.unit_id
    complete_lease(fast, str(backup.id), pushed_in_full(backup))
    assert Lease.objects.get(id=slow.id).status == Lease.Status.SUPERSEDED
    with pytest.raises(LeaseError) as err:
        get_agent_lease(str(slow.id), agent)
    assert err.value.code == "lease_expired"


def test_an_agent_clipped_in_most_of_its_pushes_is_banned_and_staff_can_lift_it(
    agent,
) -> None:  # type: ignore[no-untyped-def]
    assert not record_clipping(str(agent.id), [False] * 30)
    banned = record_clipping(str(agent.id), [True] * 60)
    agent.refresh_from_db()
    assert banned and agent.banned_at is not None and "clipped" in agent.ban_reason
    assert agent.rep_pushes == 90 and agent.rep_clipped == 60
    lift_ban(agent)
    agent.refresh_from_db()
    assert agent.banned_at is None and agent.rep_pushes == 0


def test_a_ban_reason_longer_than_its_column_is_stored_cut_to_it(agent) -> None:  # type: ignore[no-untyped-def]
    # PostgreSQL refuses a value longer than a varchar column; a spot check's detail can be.
    width = Agent._meta.get_field("ban_reason").max_length
    detail = "gradients differ: " + "x" * (3 * width)

    assert record_spot_check(str(agent.id), passed=False, detail=detail)

    agent.refresh_from_db()
    assert agent.banned_at is not None
    assert len(agent.ban_reason) == width
    assert agent.ban_reason.startswith("failed 1 spot check(s): gradients differ: x")


def test_an_agent_pushing_against_the_root_gradient_is_banned_and_the_reason_says_so(
    agent,
) -> None:  # type: ignore[no-untyped-def]
    against = PushFlags(clipped=False, cosine=-0.4)
    untested = PushFlags(clipped=False)
    assert not record_clipping(str(agent.id), [against, untested] * 9)
    assert record_clipping(str(agent.id), [against, untested] * 11)
    agent.refresh_from_db()
    assert agent.banned_at is not None
    assert "against the server's root gradient: mean cosine -0.40" in agent.ban_reason
    assert "(t = " in agent.ban_reason and agent.rep_cosine_sq_sum == pytest.approx(20 * 0.16)
    assert (agent.rep_tested, agent.rep_pushes) == (20, 40)
    assert agent.rep_cosine_sum == pytest.approx(-8.0)
    lift_ban(agent)
    agent.refresh_from_db()
    assert agent.banned_at is None and agent.rep_tested == 0 and agent.rep_cosine_sum == 0.0


def test_an_honest_agent_clipped_now_and_then_is_not_banned(agent) -> None:  # type: ignore[no-untyped-def]
    flags = ([False] * 19 + [True]) * 10  # 5% clipped, like honest agents in the attack runs
    assert not record_clipping(str(agent.id), flags)


def test_a_robust_job_holds_untrusted_pushes_until_trusted_ones_set_the_centre(
    alice, dataset
) -> None:  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, params(robust_aggregation=True))
    assert start_job(job)
    job.refresh_from_db()
    store = job_store(job)
    grad = {v.name: np.full(v.shape, 0.1, np.float32) for v in store.layout.shards[0]}
    held = store.push(0, grad, 0, "untrusted:0:0", trusted=False)
    assert held.held and not held.applied and store.versions()[0] == 0
    trusted = store.push(0, grad, 0, "trusted:0:0", trusted=True)
    assert trusted.applied and store.versions()[0] == 1


def test_a_complete_without_the_leases_pushes_is_refused(running_job, agent) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    lease = claim_work(agent)
    assert lease is not None
    size = pushed_in_full(lease)
    Lease.objects.filter(id=lease.id).update(samples_pushed=0)

    # Execute / Assert: no push, then too few, then claims that differ from the pushes.
    for pushed, claimed in ((0, size), (size // 2, size // 2), (size, size + 1), (size, 0)):
        Lease.objects.filter(id=lease.id).update(samples_pushed=pushed)
        with pytest.raises(LeaseError) as err:
            complete_lease(agent, str(lease.id), claimed)
        assert err.value.code == "bad_message"
    assert Lease.objects.get(id=lease.id).status == Lease.Status.ACTIVE


def test_a_lease_counts_no_more_samples_than_its_size_even_if_its_rounds_apply_twice(  # type: ignore[no-untyped-def]
    running_job, agent
) -> None:
    # Prepare: a lease whose rounds are recorded twice (a restore forgot the applied ids).
    lease = claim_work(agent)
    assert lease is not None
    size = pushed_in_full(lease)

    # Execute
    for _ in range(2):
        record_contribution(str(running_job.id), str(agent.id), str(lease.id), size, 1, 0, 10.0)

    # Assert: the second batch counts nothing, and earns nothing.
    assert Lease.objects.get(id=lease.id).samples == size
    running_job.refresh_from_db()
    assert running_job.samples_done == size
    agent.refresh_from_db()
    assert agent.credit == 10.0
