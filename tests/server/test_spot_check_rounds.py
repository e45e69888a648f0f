"""The spot-check rule of issue 10 (High 2): a lease may not skip its checked round.

Rounds are pushed in order, so a push past the checked round before that round arrived in
full means the agent skipped it: that fails the check (``recording.record_skipped``). The
bounds a push is held to come from the lease's size (``agents.admission.LeaseBounds``).
"""

from __future__ import annotations

import pytest

from downpour.agents.admission import LeaseBounds
from downpour.training.actions.claims import claim_work
from downpour.training.models import SpotCheck
from downpour.training.spotchecks.recording import record, record_skipped

from .test_spot_checks import honest_round, start

pytestmark = pytest.mark.django_db


def test_a_lease_has_ceil_steps_over_n_push_rounds_and_the_last_may_be_short() -> None:
    bounds = LeaseBounds(steps=23, n_push=5, batch_size=8)

    assert bounds.rounds == 5
    assert [bounds.round_samples(seq) for seq in range(6)] == [40, 40, 40, 40, 24, 0]
    assert bounds.samples == 23 * 8 == sum(bounds.round_samples(s) for s in range(5))


def test_skipping_the_checked_round_fails_the_check_and_bans(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    start(alice, dataset)
    lease = claim_work(agent)

    # Execute
    record_skipped(str(lease.id), 1, 2)

    # Assert
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == SpotCheck.Status.FAILED and check.round == 1
    assert check.detail == "round 2 arrived before round 1 had arrived in full"
    agent.refresh_from_db()
    assert agent.banned_at is not None


def test_a_round_after_the_checked_one_arrived_changes_nothing(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the checked round is in (a resumed lease's new connection does not know it).
    start(alice, dataset)
    lease = claim_work(agent)
    weights, versions, gradients, samples = honest_round(lease)
    assert record(str(lease.id), 0, [weights], versions, [], gradients, samples)

    # Execute
    record_skipped(str(lease.id), 0, 1)

    # Assert
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == SpotCheck.Status.QUEUED
    agent.refresh_from_db()
    assert agent.banned_at is None
