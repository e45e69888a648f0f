"""Spot checks: which leases and rounds are checked, and the worker's verdict on a round.

The rounds here are computed with the agent's own step (``leases.gradient_step``) on the
weights the store serves, as a real agent does; ``tests/e2e/test_spot_checks.py`` does the
same with real agent processes over the socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions.claims import claim_work
from downpour.training.actions.jobs import JobParams, start_job, submit_job
from downpour.training.actions.leases import resume_lease
from downpour.training.models import SpotCheck
from downpour.training.specs import model_spec
from downpour.training.spotcheck_selection import choose_round, round_span, should_check
from downpour.training.spotchecks.recording import record, record_unservable
from downpour.training.spotchecks.replay import STALE_RUNNING, run_pending
from downpour.training.store import job_store
from downpour_agent.data import load_shard
from downpour_agent.leases import gradient_step
from downpour_agent.modelspec import validate_model_config
from downpour_agent.modelspec.validator import uses_dropout
from downpour_agent.trainer import BatchSampler, GradientAccumulator, GradientComputer

from .helpers import mlp_config

pytestmark = pytest.mark.django_db


def start(alice, dataset, **overrides: Any):  # type: ignore[no-untyped-def]
    params = {
        "name": "mlp",
        "model_json": mlp_config(),
        "target_accuracy": 0.9,
        "batch_size": 8,
        "n_fetch": 3,
        "n_push": 5,
        "spot_check_fraction": 1.0,
        **overrides,
    }
    job = submit_job(alice, dataset, JobParams(**params))
    assert start_job(job)
    job.refresh_from_db()
    return job


def served(store: Any) -> tuple[dict[str, np.ndarray], dict[int, int]]:
    """What an agent fetching every shard of ``store`` now gets: the weights (copies) and
    each shard's version."""
    weights: dict[str, np.ndarray] = {}
    versions: dict[int, int] = {}
    for shard in range(len(store.layout.shards)):
        versions[shard], tensors = store.fetch(shard)
        weights.update({k: v.copy() for k, v in tensors.items()})
    return weights, versions


def honest_round(lease, round_index: int = 0):  # type: ignore[no-untyped-def]
    """What an honest agent fetches and pushes in round ``round_index`` of ``lease``.

    Returns ``(weights, versions, gradients, samples)``: the weights it fetched and their
    versions (the round's base versions), and its mean gradient over the round's samples.
    """
    job, unit = lease.unit.job, lease.unit
    store = job_store(job)
    # Other agents' pushes moved the store on since the lease began.
    for shard, specs in enumerate(store.layout.shards):
        grad = {v.name: np.full(v.shape, 0.01 * (round_index + 1), np.float32) for v in specs}
        store.push(shard, grad, store.versions()[shard], f"other:{round_index}:{shard}")
    weights, versions = served(store)
    computer = GradientComputer(job.model_config, job.loss, seed=12345)
    computer.set_weights(weights)
    x, y = load_shard(Path(unit.shard.path), unit.shard.n_samples)
    sampler = BatchSampler(len(x), job.batch_size, unit.seed)
    first, steps = round_span(job, unit.steps, round_index)
    for _ in range(first):
        sampler.next_indices()
    accumulator = GradientAccumulator()
    for _ in range(steps):
        gradient_step(computer, sampler, accumulator, x, y)
    return weights, versions, accumulator.mean(), accumulator.samples


def test_an_honest_first_round_passes_and_counts_for_the_agent(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    job = start(alice, dataset)
    lease = claim_work(agent)
    assert lease is not None and lease.spot_check_round is not None
    weights, versions, gradients, samples = honest_round(lease)
    # Execute
    record(str(lease.id), 0, [weights], versions, [], gradients, samples)
    assert run_pending() == 1
    # Assert
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == SpotCheck.Status.PASSED, check.detail
    assert check.steps == 5 and check.samples == 5 * 8
    assert check.relative_error is not None and check.relative_error < 1e-4
    agent.refresh_from_db()
    assert agent.rep_spot_checks_passed == 1 and agent.banned_at is None
    assert check.job_id == job.id


@pytest.mark.parametrize(
    "fake",
    [
        pytest.param(
            lambda g, rng: {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in g.items()},
            id="random",
        ),
        pytest.param(lambda g, rng: {k: -v for k, v in g.items()}, id="signflip"),
        pytest.param(lambda g, rng: {k: 1.05 * v for k, v in g.items()}, id="scaled-5-percent"),
        pytest.param(lambda g, rng: {k: np.zeros_like(v) for k, v in g.items()}, id="zeros"),
    ],
)
def test_a_faked_first_round_fails_and_bans_the_agent(alice, dataset, agent, fake) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    start(alice, dataset)
    lease = claim_work(agent)
    weights, versions, gradients, samples = honest_round(lease)
    faked = fake(gradients, np.random.default_rng(0))
    # Execute
    record(str(lease.id), 0, [weights], versions, [], faked, samples)
    run_pending()
    # Assert
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == SpotCheck.Status.FAILED and "gradients differ" in check.detail
    agent.refresh_from_db()
    assert agent.banned_at is not None and "spot check" in agent.ban_reason
    assert agent.rep_spot_checks_failed == 1


def test_a_round_on_weights_the_server_never_served_fails_at_once(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    start(alice, dataset)
    lease = claim_work(agent)
    record_unservable(str(lease.id), 0, {0: 7, 1: 9})
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == SpotCheck.Status.FAILED and "never served" in check.detail
    agent.refresh_from_db()
    assert agent.banned_at is not None
    assert run_pending() == 0, "a failed check is not run again"


def test_weights_served_but_no_longer_kept_are_no_verdict(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    start(alice, dataset)
    lease = claim_work(agent)
    record_unservable(str(lease.id), 0, {0: 7, 1: 9}, pruned=True)
    assert SpotCheck.objects.get(lease=lease).status == SpotCheck.Status.SKIPPED
    agent.refresh_from_db()
    assert agent.banned_at is None


def test_on_a_resumed_lease_unserved_versions_are_no_verdict(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    start(alice, dataset)
    lease = claim_work(agent)
    resume_lease(agent, str(lease.id))  # its earlier connection may have fetched them
    record_unservable(str(lease.id), 0, {0: 7, 1: 9})
    assert SpotCheck.objects.get(lease=lease).status == SpotCheck.Status.SKIPPED
    agent.refresh_from_db()
    assert agent.banned_at is None


def test_a_round_claiming_more_samples_than_its_steps_cover_fails(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    start(alice, dataset)
    lease = claim_work(agent)
    weights, versions, gradients, samples = honest_round(lease)
    record(str(lease.id), 0, [weights], versions, [], gradients, samples * 5)
    assert SpotCheck.objects.get(lease=lease).status == SpotCheck.Status.FAILED


def test_a_lease_is_checked_once_even_when_round_0_is_pushed_again(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    start(alice, dataset)
    lease = claim_work(agent)
    weights, versions, gradients, samples = honest_round(lease)
    assert record(str(lease.id), 0, [weights], versions, [], gradients, samples)
    assert record(str(lease.id), 0, [weights], versions, [], gradients, samples) is None
    assert SpotCheck.objects.filter(lease=lease).count() == 1


def test_a_check_whose_worker_died_is_run_again(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    start(alice, dataset)
    lease = claim_work(agent)
    weights, versions, gradients, samples = honest_round(lease)
    check = record(str(lease.id), 0, [weights], versions, [], gradients, samples)
    assert check is not None
    long_ago = check.created_at - STALE_RUNNING * 2
    SpotCheck.objects.filter(id=check.id).update(status="running", started_at=long_ago)
    assert run_pending() == 1
    assert SpotCheck.objects.get(id=check.id).status == SpotCheck.Status.PASSED


def test_a_later_round_replays_from_the_weights_it_names(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    # Prepare: round 2 of a lease, computed on weights the store served after other pushes.
    start(alice, dataset, n_push=2)
    lease = claim_work(agent)
    for earlier in (0, 1):
        honest_round(lease, earlier)
    weights, versions, gradients, samples = honest_round(lease, 2)
    assert min(versions.values()) > 0
    # Execute
    record(str(lease.id), 2, [weights], versions, [], gradients, samples)
    run_pending()
    # Assert
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == SpotCheck.Status.PASSED, check.detail
    assert (check.round, check.first_step, check.steps) == (2, 4, 2)


def test_an_agent_honest_in_its_first_rounds_but_faking_later_ones_fails(
    alice, dataset, agent
) -> None:  # type: ignore[no-untyped-def]
    start(alice, dataset, n_push=2)
    lease = claim_work(agent)
    weights, versions, gradients, samples = honest_round(lease, 3)
    # The right gradient, but of the round before (replayed data): what a lazy faker sends.
    _, _, stale, _ = honest_round(lease, 2)
    record(str(lease.id), 3, [weights], versions, [], stale, samples)
    run_pending()
    assert SpotCheck.objects.get(lease=lease).status == SpotCheck.Status.FAILED


def test_a_round_that_loaded_new_weights_midway_replays_with_the_load(
    alice, dataset, agent
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: round 1 (steps 4-7) ran 2 steps on version A, then loaded version B.
    job = start(alice, dataset, n_push=4)
    lease = claim_work(agent)
    unit = lease.unit
    store = job_store(job)
    fetched = []
    for bump in range(2):
        for shard, specs in enumerate(store.layout.shards):
            grad = {v.name: np.full(v.shape, 0.02, np.float32) for v in specs}
            store.push(shard, grad, store.versions()[shard], f"other:{bump}:{shard}")
        versions, weights = {}, {}
        for shard in range(len(store.layout.shards)):
            versions[shard], tensors = store.fetch(shard)
            weights.update({k: v.copy() for k, v in tensors.items()})
        fetched.append((versions, weights))
    (base, first), (later, second) = fetched
    computer = GradientComputer(job.model_config, job.loss, seed=1)
    x, y = load_shard(Path(unit.shard.path), unit.shard.n_samples)
    sampler = BatchSampler(len(x), job.batch_size, unit.seed)
    for _ in range(4):
        sampler.next_indices()
    accumulator = GradientAccumulator()
    for offset in range(4):
        computer.set_weights(first if offset < 2 else second)
        gradient_step(computer, sampler, accumulator, x, y)
    loads = [[2, [later[s] for s in sorted(later)]]]
    # Execute
    record(str(lease.id), 1, [first, second], base, loads, accumulator.mean(), accumulator.samples)
    run_pending()
    # Assert
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == SpotCheck.Status.PASSED, check.detail
    assert check.loads == loads


def test_a_round_claiming_a_load_outside_its_steps_fails(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    start(alice, dataset, n_push=4)
    lease = claim_work(agent)
    weights, versions, gradients, samples = honest_round(lease, 0)
    loads = [[9, [versions[s] for s in sorted(versions)]]]
    record(str(lease.id), 0, [weights, weights], versions, loads, gradients, samples)
    check = SpotCheck.objects.get(lease=lease)
    assert check.status == SpotCheck.Status.FAILED and "loads outside" in check.detail


def test_the_round_checked_is_drawn_over_all_of_a_leases_rounds(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    job = start(alice, dataset, n_push=4)
    agent = Agent.objects.select_related("token").get(id=agent.id)
    drawn = [choose_round(job, agent, 18) for _ in range(2000)]
    counts = {k: drawn.count(k) for k in set(drawn)}
    assert set(counts) == {0, 1, 2, 3, 4}  # ceil(18 / 4) rounds; the last one is short
    assert min(counts.values()) > 300  # about 400 each


def test_leases_are_checked_at_the_jobs_fraction_and_never_for_trusted_agents(
    alice, dataset, agent, charlie
) -> None:  # type: ignore[no-untyped-def]
    job = start(alice, dataset, spot_check_fraction=0.05)
    agent = Agent.objects.select_related("token").get(id=agent.id)
    checked = sum(should_check(job, agent) for _ in range(4000))
    # Binomial(4000, 0.05): mean 200, sd 13.8; the bounds are 5 sd out.
    assert 131 <= checked <= 269
    trusted, _ = AgentToken.issue(charlie, "ops")
    AgentToken.objects.filter(id=trusted.id).update(is_trusted=True)
    ops = Agent.objects.select_related("token").create(token_id=trusted.id, name="ops-1")
    ops = Agent.objects.select_related("token").get(id=ops.id)
    job.spot_check_fraction = 1.0
    assert not any(should_check(job, ops) for _ in range(100))


def test_an_always_faking_agent_is_caught_within_100_units_with_probability_99(
    alice, dataset, agent
) -> None:  # type: ignore[no-untyped-def]
    # The server's own choice, as claim_work makes it, at the default fraction.
    job = start(alice, dataset, spot_check_fraction=0.05)
    agent = Agent.objects.select_related("token").get(id=agent.id)
    trials = 3000
    caught = sum(any(should_check(job, agent) for _ in range(100)) for _ in range(trials))
    # Expected 1 - 0.95**100 = 0.9941 (sd 0.0014 over 3000 trials).
    assert caught / trials >= 0.988


def test_models_with_dropout_are_not_spot_checked(alice, dataset, agent) -> None:  # type: ignore[no-untyped-def]
    config = mlp_config()
    layers = config["config"]["layers"]
    dropout = {
        "module": "keras.layers",
        "class_name": "Dropout",
        "config": {
            "name": "drop",
            "trainable": True,
            "dtype": layers[1]["config"]["dtype"],
            "rate": 0.5,
        },
        "registered_name": None,
    }
    config["config"]["layers"] = [*layers[:2], dropout, *layers[2:]]
    job = start(alice, dataset, model_json=config)
    assert uses_dropout(model_spec(job))
    assert claim_work(agent).spot_check_round is None
    assert not uses_dropout(validate_model_config(mlp_config()))
