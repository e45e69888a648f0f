"""Spot checks of local-steps rounds: a replay that matches passes, a push near it is no
verdict (H inner steps amplify float rounding, so honest rounds diverge from their replay),
and one far from it fails.

The honest round is computed with the agent's own code (``replay_local_round``) on the
weights the store serves, as a real agent does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from downpour.training.actions.claims import claim_work
from downpour.training.actions.jobs import JobParams, start_job, submit_job
from downpour.training.models import Job, SpotCheck
from downpour.training.spotcheck_selection import round_span
from downpour.training.spotchecks.recording import record
from downpour.training.spotchecks.replay import run_pending
from downpour.training.store import job_store
from downpour_agent.data import load_shard
from downpour_agent.local_steps import replay_local_round
from downpour_agent.protocol import LocalSteps
from downpour_agent.trainer import GradientComputer

from .helpers import mlp_config
from .test_spot_checks import served

pytestmark = pytest.mark.django_db


def start(alice: Any, dataset: Any) -> Job:
    params = JobParams(
        name="local",
        model_json=mlp_config(),
        target_accuracy=0.9,
        batch_size=8,
        algorithm="local-steps",
        inner_steps=6,
        inner_optimizer="adamw",
        inner_learning_rate=0.001,
        spot_check_fraction=1.0,
    )
    job = submit_job(alice, dataset, params)
    assert start_job(job)
    job.refresh_from_db()
    return job


def honest_round(lease: Any) -> tuple[dict[str, np.ndarray], dict[int, int], dict[str, Any], int]:
    """Round 0 of ``lease`` as an honest agent computes it: the weights it fetched, their
    versions, its pseudo-gradient and samples."""
    job, unit = lease.unit.job, lease.unit
    weights, versions = served(job_store(job))
    computer = GradientComputer(job.model_config, job.loss, seed=12345)
    computer.set_weights(weights)
    x, y = load_shard(Path(unit.shard.path), unit.shard.n_samples)
    first, steps = round_span(job, unit.steps, 0, lease.round_steps)
    pseudo, samples = replay_local_round(
        computer,
        LocalSteps(job.inner_optimizer, job.inner_learning_rate),
        x,
        y,
        batch_size=job.batch_size,
        seed=unit.seed,
        first_step=first,
        steps=steps,
    )
    return weights, versions, pseudo, samples


def diverged(pseudo: dict[str, np.ndarray], error: float) -> dict[str, np.ndarray]:
    """``pseudo`` turned away from itself: every tensor ``error`` (relative) from it."""
    rng = np.random.default_rng(0)
    out = {}
    for name, value in pseudo.items():
        noise = rng.normal(size=value.shape)
        noise -= (
            noise.ravel() @ value.ravel() / max(float(value.ravel() @ value.ravel()), 1e-30) * value
        )
        scale = error * np.linalg.norm(value) / max(float(np.linalg.norm(noise)), 1e-30)
        out[name] = (value + scale * noise).astype(np.float32)
    return out


@pytest.mark.parametrize(
    ("push", "status", "banned"),
    [
        pytest.param(lambda g: g, SpotCheck.Status.PASSED, False, id="honest"),
        # As far as honest rounds of hundreds of AdamW steps were seen from their replay.
        pytest.param(lambda g: diverged(g, 0.8), SpotCheck.Status.SKIPPED, False, id="diverged"),
        pytest.param(lambda g: diverged(g, 0.4), SpotCheck.Status.SKIPPED, False, id="near"),
        pytest.param(
            lambda g: {k: np.zeros_like(v) for k, v in g.items()},
            SpotCheck.Status.FAILED,
            True,
            id="zeros",
        ),
        pytest.param(
            lambda g: {k: -v for k, v in g.items()}, SpotCheck.Status.FAILED, True, id="signflip"
        ),
        pytest.param(
            lambda g: {k: -0.4 * v for k, v in g.items()},
            SpotCheck.Status.FAILED,
            True,
            id="signflip-scaled-0.4",
        ),
        pytest.param(
            lambda g: {k: 3 * v for k, v in g.items()}, SpotCheck.Status.FAILED, True, id="scaled-3"
        ),
        pytest.param(
            lambda g: {k: 0.3 * v for k, v in g.items()},
            SpotCheck.Status.FAILED,
            True,
            id="scaled-0.3",
        ),
        pytest.param(lambda g: diverged(g, 3.0), SpotCheck.Status.FAILED, True, id="unrelated"),
    ],
)
def test_a_local_steps_round_passes_gives_no_verdict_or_fails_by_its_distance(
    alice: Any, dataset: Any, agent: Any, push: Any, status: str, banned: bool
) -> None:
    # Prepare: round 0 of a checked lease, as an honest agent computed it.
    start(alice, dataset)
    lease = claim_work(agent)
    assert lease is not None and lease.spot_check_round is not None
    weights, versions, pseudo, samples = honest_round(lease)
    # Execute: the agent pushes this instead.
    record(str(lease.id), 0, [weights], versions, [], push(pseudo), samples)
    assert run_pending() == 1
    # Assert
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == status, (check.relative_error, check.detail)
    if status == SpotCheck.Status.SKIPPED:
        assert "inconclusive" in check.detail
    agent.refresh_from_db()
    assert (agent.banned_at is not None) is banned, agent.ban_reason
