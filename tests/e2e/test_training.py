"""End to end: real daphne, Celery, PostgreSQL, Redis and agent processes train the digits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .stack import Stack, held, wait_registered

pytestmark = pytest.mark.e2e


def _trains_digits_to_90(stack: Stack) -> None:
    # Prepare
    # At a learning rate of 0.05 the job reached 90% within 3 s of its first lease, and an
    # idle agent asks for work every 2 s: the second agent could join after it had finished.
    seeded = stack.seed(target_accuracy=0.9, learning_rate=0.02, name="digits-90")
    # Execute: both agents are up before the job runs.
    with held(stack, seeded["job_id"]):
        stack.start_agent("agent-a", seeded["token"])
        stack.start_agent("agent-b", seeded["token"])
        wait_registered(stack, "agent-a", "agent-b")
    stack.wait_for(
        "the job to finish", lambda: stack.job(seeded["job_id"])["status"] in ("done", "failed")
    )
    # Assert
    job = stack.job(seeded["job_id"])
    assert job["status"] == "done", stack.logs()
    assert job["best_accuracy"] >= 0.9
    # The job is marked done first (once), then exported.
    (keras_path, weights_path) = stack.wait_for(
        "the export",
        lambda: stack.query(
            "SELECT keras_path, weights_path FROM training_job WHERE id = %s AND keras_path <> ''",
            [seeded["job_id"]],
        ),
        timeout=120,
    )[0]
    assert Path(keras_path).stat().st_size > 0 and Path(weights_path).stat().st_size > 0
    agents = stack.query(
        "SELECT COUNT(DISTINCT agent_id) FROM training_lease l JOIN training_workunit u "
        "ON l.unit_id = u.id WHERE u.job_id = %s",
        [seeded["job_id"]],
    )[0][0]
    assert agents == 2
    for name in ("agent-a", "agent-b"):
        stack.kill_agent(name)


@pytest.mark.services
def test_two_agents_train_the_digits_mlp_to_90_percent_on_the_production_path(
    production: Stack,
) -> None:
    _trains_digits_to_90(production)
    # The web process served the whole exchange without TensorFlow: workers build models.
    assert production.server is not None
    maps = Path(f"/proc/{production.server.pid}/maps").read_text()
    assert "tensorflow" not in maps


def test_two_agents_train_the_digits_mlp_to_90_percent_on_the_embedded_path(
    embedded: Stack,
) -> None:
    _trains_digits_to_90(embedded)


@pytest.mark.services
def test_training_finishes_when_an_agent_is_killed_mid_lease_and_no_push_is_applied_twice(
    production: Stack,
) -> None:
    # Prepare: a job that runs for a fixed time, so the kill lands mid-training.
    seeded = production.seed(target_accuracy=1.0, budget_seconds=45, name="digits-kill", tokens=2)
    job_id = seeded["job_id"]
    with held(production, job_id):
        # Both slowed to 4 steps/s until the kill: at full speed a first unit of 20 steps
        # can complete between the query below and the kill (and a completed lease never
        # expires); a slow victim beside a fast survivor has nearly every push refused as
        # stale, so it would rarely hold a lease with a push applied. The replacement runs
        # at full speed and finishes the job.
        victim = production.start_agent(
            "victim", seeded["tokens"][0], "--max-steps-per-second", "4"
        )
        production.start_agent("survivor", seeded["tokens"][1], "--max-steps-per-second", "4")
        wait_registered(production, "victim", "survivor")
    lease_of_victim = production.wait_for(
        "the victim to push on a lease",
        lambda: production.query(
            "SELECT l.id, l.unit_id FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "JOIN training_workunit u ON l.unit_id = u.id "
            "WHERE a.name = 'victim' AND l.status = 'active' AND l.pushes_accepted > 0 "
            "AND u.job_id = %s",
            [job_id],
        ),
    )[0]
    lease_id, unit_id = lease_of_victim

    # Execute
    os.killpg(victim.pid, 9)
    victim.wait()
    production.start_agent("replacement", seeded["tokens"][0])

    # Assert: the lease expires and its unit is reissued to the survivor.
    production.wait_for(
        "the victim's lease to expire",
        lambda: (
            production.query("SELECT status FROM training_lease WHERE id = %s", [lease_id])[0][0]
            == "expired"
        ),
        timeout=60,
    )
    production.wait_for(
        "the victim's unit to be leased again",
        lambda: (
            production.query(
                "SELECT COUNT(*) FROM training_lease WHERE unit_id = %s AND id <> %s",
                [unit_id, lease_id],
            )[0][0]
            >= 1
        ),
        timeout=60,
    )
    production.wait_for(
        "the job to finish", lambda: production.job(job_id)["status"] in ("done", "failed")
    )
    production.kill_agent("survivor")
    production.kill_agent("replacement")
    job = production.job(job_id)
    assert job["status"] == "done"
    assert job["best_accuracy"] >= 0.9
    # Every applied push bumps one shard version exactly once, and every accepted push is
    # counted once by the consumer that applied it: the two totals agree only if no push
    # was applied twice (or lost from the books).
    production.wait_for(
        "the accepted-push count to match the store's versions",
        lambda: sum(production.store_versions(job_id)) == production.job(job_id)["pushes_accepted"],
        timeout=20,
    )
    assert production.job(job_id)["pushes_accepted"] > 0
