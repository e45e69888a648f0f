"""End to end, synchronous steps with backup workers (Chen et al. 2016) on the real stack:
daphne, Celery, PostgreSQL, Redis and agent processes."""

from __future__ import annotations

import os
from typing import Any

import pytest

from .stack import Stack, held, wait_registered

pytestmark = [pytest.mark.e2e, pytest.mark.services]


def sync_counts(stack: Stack, job_id: str) -> dict[str, int]:
    """The job's counters straight from Redis: steps, timeouts, late (shard 0's)."""
    from downpour.hotstate.keys import sync_counts_key

    raw = stack._redis().hgetall(sync_counts_key(stack.env["STORE_PREFIX"], job_id))
    return {k.decode(): int(v) for k, v in raw.items()}


def counted_ids(stack: Stack, job_id: str) -> tuple[int, int]:
    """Push ids applied by the store, and those still in a step's buffer (all shards)."""
    from downpour.hotstate.keys import shard_key

    client: Any = stack._redis()
    prefix = stack.env["STORE_PREFIX"]
    applied = sum(
        int(client.scard(key))
        for key in client.scan_iter(match=shard_key(prefix, job_id, "*", "applied"))
    )
    buffered = sum(
        sum(1 for name in client.hkeys(key) if name.startswith(b"g:"))
        for key in client.scan_iter(match=shard_key(prefix, job_id, "*", "sync"))
    )
    return applied, buffered


def assert_each_counted_push_applied_once(stack: Stack, job_id: str, workers: int) -> None:
    """Every push acknowledged as counted is applied once or still waits in its step; each
    applied step bumped its shard's version once and averaged 1 to N gradients."""
    stack.wait_for(
        "the consumers' tallies to reach the database",
        lambda: sum(counted_ids(stack, job_id)) == stack.job(job_id)["pushes_accepted"],
        timeout=20,
    )
    applied, _ = counted_ids(stack, job_id)
    steps = sum(stack.store_versions(job_id))
    assert steps <= applied <= workers * steps


def test_three_agents_train_the_digits_mlp_to_95_percent_in_synchronous_steps(
    production: Stack,
) -> None:
    # Prepare: N = 2 of N + b = 3 agents per step.
    seeded = production.seed(
        target_accuracy=0.95, algorithm="sync", sync_workers=2, sync_backups=1, name="sync-95"
    )
    job_id = seeded["job_id"]
    names = ("sync-a", "sync-b", "sync-c")
    with held(production, job_id):
        for name in names:
            production.start_agent(name, seeded["token"])
        wait_registered(production, *names)

    # Execute
    production.wait_for(
        "the job to finish",
        lambda: production.job(job_id)["status"] in ("done", "failed"),
        timeout=600,
    )

    # Assert
    job = production.job(job_id)
    assert job["status"] == "done", production.logs()
    assert job["best_accuracy"] >= 0.95
    counts = sync_counts(production, job_id)
    assert counts["steps"] >= 10
    assert counts.get("late", 0) >= 1  # three agents, two per step: the backup's are dropped
    assert_each_counted_push_applied_once(production, job_id, workers=2)
    agents = production.query(
        "SELECT COUNT(DISTINCT agent_id) FROM training_lease l JOIN training_workunit u "
        "ON l.unit_id = u.id WHERE u.job_id = %s",
        [job_id],
    )[0][0]
    assert agents == 3
    for name in names:
        production.kill_agent(name)


def test_a_kill_mid_step_loses_nothing_and_applies_nothing_twice(production: Stack) -> None:
    # Prepare: N = 2, b = 0, so that after the kill only the timeout completes a step
    # until the replacement takes the victim's place. The budget is a backstop: the test
    # stops the agents itself once the replacement has pushed.
    seeded = production.seed(
        target_accuracy=1.0,
        budget_seconds=600,
        algorithm="sync",
        sync_workers=2,
        sync_backups=0,
        sync_step_timeout=2.0,
        name="sync-kill",
        tokens=2,
    )
    job_id = seeded["job_id"]
    with held(production, job_id):
        victim = production.start_agent("sync-victim", seeded["tokens"][0])
        production.start_agent("sync-survivor", seeded["tokens"][1])
        wait_registered(production, "sync-victim", "sync-survivor")
    production.wait_for(
        "the victim to push in a step",
        lambda: production.query(
            "SELECT l.id FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "JOIN training_workunit u ON l.unit_id = u.id WHERE a.name = 'sync-victim' "
            "AND l.status = 'active' AND l.pushes_accepted > 0 AND u.job_id = %s",
            [job_id],
        ),
    )

    # Execute: kill -9 mid-step; the survivor's steps complete by the timeout until the
    # replacement (started at once: it takes a while to import TensorFlow) joins.
    os.killpg(victim.pid, 9)
    victim.wait()
    before = sync_counts(production, job_id)
    production.start_agent("sync-replacement", seeded["tokens"][0])
    production.wait_for(
        "a step applied by the timeout",
        lambda: sync_counts(production, job_id).get("timeouts", 0) > before.get("timeouts", 0),
        timeout=60,
    )
    production.wait_for(
        "the replacement to take the victim's place",
        lambda: production.query(
            "SELECT l.id FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "JOIN training_workunit u ON l.unit_id = u.id WHERE a.name = 'sync-replacement' "
            "AND l.pushes_accepted > 0 AND u.job_id = %s",
            [job_id],
        ),
        timeout=240,
    )
    steps = sync_counts(production, job_id)["steps"]
    production.wait_for(
        "more steps with the replacement",
        lambda: sync_counts(production, job_id)["steps"] >= steps + 5,
        timeout=60,
    )
    production.kill_agent("sync-survivor")
    production.kill_agent("sync-replacement")

    # Assert: every counted push applied once (or waiting in its step), and no unit lost:
    # once the reaper has ended the killed agents' leases, each unit is done or queued.
    assert_each_counted_push_applied_once(production, job_id, workers=2)
    production.wait_for(
        "the killed agents' leases to be reaped",
        lambda: (
            not production.query(
                "SELECT l.id FROM training_lease l JOIN training_workunit u ON l.unit_id = u.id "
                "WHERE u.job_id = %s AND l.status = 'active'",
                [job_id],
            )
        ),
        timeout=60,
    )
    statuses = production.query(
        "SELECT status, COUNT(*) FROM training_workunit WHERE job_id = %s GROUP BY status",
        [job_id],
    )
    assert {status for status, _ in statuses} <= {"done", "pending"}, statuses
    assert dict(statuses).get("pending", 0) >= 1  # the killed agents' units, back in the queue
