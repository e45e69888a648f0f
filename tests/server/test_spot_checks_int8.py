"""Spot checks of int8 pushes: the verifier allows for quantisation and the carried residual.

An honest agent pushes ``int8(g + r)`` where ``r`` is the residual its previous round left
(error feedback); the recomputed round is ``g``. The consumer records, per tensor, the
largest error of this push's encoding and of the previous round's, and the verifier adds
them to its tolerance: honest pushes pass, fakes still fail.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from downpour.scheduler import reputation
from downpour.training.actions.claims import claim_work
from downpour.training.models import SpotCheck
from downpour.training.spotchecks.recording import Recording, record
from downpour.training.spotchecks.replay import run_pending
from downpour_agent.protocol import ErrorFeedback
from downpour_agent.protocol.quantize import error_bound, int8_round_trip

from .test_spot_checks import honest_round, start

pytestmark = pytest.mark.django_db


def int8_round(
    gradients: dict[str, np.ndarray], previous: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """An honest agent's int8 push of ``gradients`` after a round that pushed ``previous``
    (whose residual it carries), and the allowances the consumer would record."""
    feedback = ErrorFeedback()
    recording = Recording()
    sent_before = {k: int8_round_trip(feedback.correct(k, v)) for k, v in previous.items()}
    recording.add_previous_bounds({k: error_bound(v) for k, v in sent_before.items()})
    pushed = {k: int8_round_trip(feedback.correct(k, v)) for k, v in gradients.items()}
    recording.add_push(
        {"shard": 0, "base_version": 0, "samples": 0},
        pushed,
        {k: error_bound(v) for k, v in pushed.items()},
    )
    return pushed, recording.allowances()


def verdict(lease: Any, pushed: Any, honest: Any, allowance: dict[str, float]) -> SpotCheck:
    weights, versions, _, samples = honest
    record(str(lease.id), 0, [weights], versions, [], pushed, samples, allowance)
    run_pending()
    return SpotCheck.objects.get(lease=lease)


def test_an_honest_int8_round_carrying_a_large_residual_passes_thanks_to_the_allowance(
    alice: Any, dataset: Any, agent: Any
) -> None:
    # Prepare: the round before had gradients 30x larger (early training), so the residual
    # it left is several % of this round's gradient: more than the plain 1e-2 tolerance
    start(alice, dataset)
    lease = claim_work(agent)
    honest = honest_round(lease)
    gradients = honest[2]
    previous = {k: 30 * v for k, v in gradients.items()}
    pushed, allowance = int8_round(gradients, previous)
    assert not reputation.gradients_match(pushed, gradients)

    # Execute
    check = verdict(lease, pushed, honest, allowance)

    # Assert
    assert check.status == SpotCheck.Status.PASSED, check.detail
    assert set(check.quantisation_allowance) == set(gradients)


def test_a_scaled_fake_sent_as_int8_still_fails(alice: Any, dataset: Any, agent: Any) -> None:
    start(alice, dataset)
    lease = claim_work(agent)
    honest = honest_round(lease)
    gradients = honest[2]
    pushed, allowance = int8_round({k: 1.05 * v for k, v in gradients.items()}, gradients)

    check = verdict(lease, pushed, honest, allowance)

    assert check.status == SpotCheck.Status.FAILED and "gradients differ" in check.detail
