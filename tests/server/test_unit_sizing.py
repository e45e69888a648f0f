"""An agent cannot hoard a job: units come from measured work, and what one agent holds is capped.

Reported: an agent claiming ``samples_per_s = 1e9`` got one lease of a job's whole
500,000-sample budget and kept it alive with heartbeats; one agent held 80 leases at once;
the registration benchmark made units 20,000 steps long.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions.claims import SIZING, claim_work
from downpour.training.actions.contributions import record_contribution
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.actions.leases import complete_lease
from downpour.training.models import Job, Lease

from .helpers import job_params

pytestmark = pytest.mark.django_db

BUDGET = 500_000
BATCH = 32


@pytest.fixture
def budget_job(alice, dataset):  # type: ignore[no-untyped-def]
    job = submit_job(
        alice, dataset, job_params(target_accuracy=None, budget_samples=BUDGET, batch_size=BATCH)
    )
    assert start_job(job)
    job.refresh_from_db()
    return job


@pytest.fixture
def boaster(charlie):  # type: ignore[no-untyped-def]
    """Charlie's agent, registered with a benchmark of 1e9 samples/s."""
    token, _ = AgentToken.issue(charlie, "fast")
    return Agent.objects.create(token=token, name="boaster", samples_per_s=1e9)


def held_samples(agent: Agent) -> int:
    leases = Lease.objects.filter(agent=agent, status=Lease.Status.ACTIVE).select_related("unit")
    return sum(lease.unit.steps * BATCH for lease in leases)


def pushed_in_full(lease: Lease) -> int:
    """Record every round of ``lease`` as arrived (``complete`` needs it); its samples."""
    unit = lease.unit
    size = int(unit.steps * min(unit.job.batch_size, unit.shard.n_samples))
    Lease.objects.filter(id=lease.id).update(samples_pushed=size, spot_check_round=None)
    return size


def completed_in_full(job: Job, agent: Agent, lease: Lease) -> int:
    """Every round of ``lease`` arrived and counted, then its ``complete``; its samples."""
    size = pushed_in_full(lease)
    record_contribution(str(job.id), str(agent.id), str(lease.id), size, 63, 0, 0.0)
    complete_lease(agent, str(lease.id), size)
    return size


def two_leases_at_200_samples_per_s(agent: Agent) -> tuple[Lease, Lease]:
    """``agent``, measured at 200 samples/s, claims two leases (its most)."""
    Agent.objects.filter(id=agent.id).update(measured_samples_per_s=200.0)
    agent.refresh_from_db()
    first, second = claim_work(agent), claim_work(agent)
    assert first is not None and second is not None
    return first, second


def test_an_agent_claiming_1e9_samples_per_s_gets_a_small_first_unit(budget_job, boaster) -> None:  # type: ignore[no-untyped-def]
    lease = claim_work(boaster)
    assert lease is not None
    assert lease.unit.steps == SIZING.first_unit_steps == 20


def test_an_agent_cannot_hold_more_than_two_leases(budget_job, boaster) -> None:  # type: ignore[no-untyped-def]
    first, second, third = claim_work(boaster), claim_work(boaster), claim_work(boaster)
    assert first is not None and second is not None
    assert third is None
    assert Lease.objects.filter(agent=boaster, status=Lease.Status.ACTIVE).count() == 2
    complete_lease(boaster, str(first.id), pushed_in_full(first))
    assert claim_work(boaster) is not None


def test_a_jobs_budget_cannot_go_to_one_agent_even_at_a_measured_1e9(budget_job, boaster) -> None:  # type: ignore[no-untyped-def]
    Agent.objects.filter(id=boaster.id).update(measured_samples_per_s=1e9)
    boaster.refresh_from_db()
    first, second = claim_work(boaster), claim_work(boaster)
    assert first is not None
    assert second is None or second.unit.job_id != budget_job.id
    # What it holds stays within a quarter of what is left, not the whole budget.
    assert held_samples(boaster) <= SIZING.max_budget_share * BUDGET
    # ...and an honest agent still finds work.
    token, _ = AgentToken.issue(boaster.token.owner, "honest")
    honest = Agent.objects.create(token=token, name="honest", samples_per_s=3000.0)
    assert claim_work(honest) is not None


def test_an_agent_holding_its_share_gets_no_more_of_that_job(budget_job, boaster) -> None:  # type: ignore[no-untyped-def]
    Agent.objects.filter(id=boaster.id).update(measured_samples_per_s=1e9)
    boaster.refresh_from_db()
    Job.objects.filter(id=budget_job.id).update(samples_done=BUDGET - 64_000)
    first = claim_work(boaster)
    assert first is not None and first.unit.steps == 64_000 // 4 // BATCH
    assert claim_work(boaster) is None  # a quarter of what is left is already its


def test_with_a_measured_rate_units_take_about_the_target_time(budget_job, agent) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the first lease ran all its samples at 200 samples/s of real work; every
    # round arrived (``complete`` is refused otherwise).
    first = claim_work(agent)
    assert first is not None
    size = pushed_in_full(first)
    record_contribution(str(budget_job.id), str(agent.id), str(first.id), size, 63, 0, 0.0)
    ran = timedelta(seconds=size / 200.0)
    Lease.objects.filter(id=first.id).update(issued_at=timezone.now() - ran)
    first.refresh_from_db()
    # Execute
    complete_lease(agent, str(first.id), size)
    agent.refresh_from_db()
    second = claim_work(agent)
    # Assert
    assert agent.measured_samples_per_s == pytest.approx(200.0, rel=0.01)
    assert second is not None
    seconds = second.unit.steps * BATCH / agent.measured_samples_per_s
    assert seconds == pytest.approx(settings.UNIT_TARGET_SECONDS, rel=0.05)


def test_a_lease_claimed_ahead_is_timed_from_the_last_ones_end(budget_job, agent) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a measured agent claims its next lease 2 s before its current one ends (the
    # agent's lease-end overlap); the next lease then runs for about 8 s more.
    first, second = two_leases_at_200_samples_per_s(agent)
    now = timezone.now()
    first_ended = now - timedelta(seconds=8)
    Lease.objects.filter(id=first.id).update(issued_at=now - timedelta(seconds=20))
    Lease.objects.filter(id=second.id).update(issued_at=now - timedelta(seconds=10))
    complete_lease(agent, str(first.id), pushed_in_full(first))
    Lease.objects.filter(id=first.id).update(ended_at=first_ended)
    Agent.objects.filter(id=agent.id).update(measured_samples_per_s=200.0)

    # Execute
    size = completed_in_full(budget_job, agent, second)

    # Assert: the second lease's samples over its time since the first ended, not since its
    # issue 2 s earlier (the measured rate is the EWMA of 200 and the new measurement).
    agent.refresh_from_db()
    ran_for = (Lease.objects.get(id=second.id).ended_at - first_ended).total_seconds()
    assert agent.measured_samples_per_s == pytest.approx(0.5 * 200 + 0.5 * size / ran_for, rel=0.01)
    from_issue = 0.5 * 200 + 0.5 * size / (ran_for + 2.0)
    assert agent.measured_samples_per_s > from_issue * 1.05


def test_a_lease_issued_after_this_one_does_not_shorten_its_time(budget_job, agent) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the agent holds a lease and claims another 1 s later, which goes back 2 s
    # after the first's issue (say its job was paused); the first runs 10 s in all.
    first, second = two_leases_at_200_samples_per_s(agent)
    now = timezone.now()
    issued = now - timedelta(seconds=10)
    Lease.objects.filter(id=first.id).update(issued_at=issued)
    Lease.objects.filter(id=second.id).update(
        issued_at=now - timedelta(seconds=9),
        status=Lease.Status.RETURNED,
        ended_at=now - timedelta(seconds=8),
    )
    Agent.objects.filter(id=agent.id).update(measured_samples_per_s=200.0)

    # Execute
    size = completed_in_full(budget_job, agent, first)

    # Assert: timed from its own issue: the other lease was not running when it was issued.
    agent.refresh_from_db()
    ran_for = (Lease.objects.get(id=first.id).ended_at - issued).total_seconds()
    assert agent.measured_samples_per_s == pytest.approx(0.5 * 200 + 0.5 * size / ran_for, rel=0.01)
