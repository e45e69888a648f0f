"""End to end: pausing, resuming, revoking and banning with real agent processes (issue 9).

Real daphne, Celery, PostgreSQL, Redis and agent processes on the production path. Each
control goes through ``manage.py control``, which runs the same action as the pages, in
another process: what the agents hear travels through the Redis channel layer.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from downpour.devprocs import manage
from downpour_agent.connection import EXIT_FATAL

from .stack import Stack, held, wait_registered

pytestmark = [pytest.mark.e2e, pytest.mark.services]

#: Leases an agent may be given during a pause at most (none is expected: a claim only
#: picks running jobs; the old code took about 50 a second).
PAUSE_LEASE_BOUND = 2


def control(stack: Stack, *args: str) -> None:
    manage(["control", *args], stack.env)


def leases_of(stack: Stack, job_id: str, status: str | None = None) -> int:
    sql = (
        "SELECT COUNT(*) FROM training_lease l JOIN training_workunit u ON l.unit_id = u.id "
        "WHERE u.job_id = %s"
    )
    params = [job_id]
    if status is not None:
        sql += " AND l.status = %s"
        params.append(status)
    return int(stack.query(sql, params)[0][0])


def agent_row(stack: Stack, name: str) -> tuple[bool, int, float]:
    connected, abandoned, scale = stack.query(
        "SELECT connected, leases_abandoned, unit_scale FROM donors_agent WHERE name = %s", [name]
    )[0]
    return bool(connected), int(abandoned), float(scale)


def log_of(stack: Stack, name: str) -> str:
    return (stack.workdir / f"{name}.log").read_text(errors="replace")


def test_a_paused_job_hands_its_leases_back_without_a_storm_and_resumes_from_the_store(
    production: Stack,
) -> None:
    # Prepare: two agents training one job
    # A time budget, so the job is still running when it is paused; the pause counts
    # against it, and the rest is long enough to see training go on.
    seeded = production.seed(target_accuracy=1.0, budget_seconds=60, name="digits-pause", tokens=2)
    job_id = seeded["job_id"]
    with held(production, job_id):
        production.start_agent("pause-a", seeded["tokens"][0])
        production.start_agent("pause-b", seeded["tokens"][1])
        wait_registered(production, "pause-a", "pause-b")
    production.wait_for(
        "pushes on the job", lambda: production.job(job_id)["pushes_accepted"] > 0, 120
    )

    # Execute: pause
    control(production, "pause", job_id)
    paused_at = time.monotonic()
    production.wait_for(
        "an agent to hear job_paused",
        lambda: any(
            f"job {job_id} paused" in log_of(production, n) for n in ("pause-a", "pause-b")
        ),
        10,
    )
    leases_before = leases_of(production, job_id)
    versions_paused = production.store_versions(job_id)
    samples_paused = production.job(job_id)["samples_done"]
    # Longer than a lease lives (4 s) and the reaper's interval: an abandoned lease would
    # have been counted by now.
    time.sleep(8)

    # Assert: nothing leased, nothing trained, nobody charged
    assert time.monotonic() - paused_at >= 8
    assert leases_of(production, job_id, "active") == 0
    assert leases_of(production, job_id) - leases_before <= PAUSE_LEASE_BOUND
    assert production.job(job_id)["status"] == "paused"
    assert production.store_versions(job_id) == versions_paused
    for name in ("pause-a", "pause-b"):
        assert agent_row(production, name) == (True, 0, 1.0), production.logs()

    # Execute: resume
    control(production, "resume", job_id)
    production.wait_for(
        "the job to finish", lambda: production.job(job_id)["status"] in ("done", "failed"), 240
    )

    # Assert: it went on from the store (versions only grew) and finished; no one charged
    job = production.job(job_id)
    assert job["status"] == "done", production.logs()
    assert job["samples_done"] > samples_paused
    assert all(
        after >= before
        for after, before in zip(
            [
                int(v)
                for v in production.query(
                    "SELECT versions FROM training_evaluation WHERE job_id = %s "
                    "ORDER BY created_at DESC LIMIT 1",
                    [job_id],
                )[0][0]
            ],
            versions_paused,
            strict=True,
        )
    )
    for name in ("pause-a", "pause-b"):
        assert agent_row(production, name)[1:] == (0, 1.0)
        log = log_of(production, name)
        # A normal end is one INFO line, never a warning.
        assert not [line for line in log.splitlines() if " WARNING " in line and job_id in line]
        production.kill_agent(name)


def test_revoking_a_token_cuts_its_agent_off_within_two_seconds_and_reissues_its_lease(
    production: Stack,
) -> None:
    # Prepare: a long job, one agent per token
    seeded = production.seed(
        target_accuracy=1.0, budget_seconds=120, name="digits-revoke", tokens=2
    )
    job_id = seeded["job_id"]
    with held(production, job_id):
        # Slowed to 1 step/s, so the lease it holds is still live when the revocation lands
        # (a first unit is 20 steps, done in well under a second at full speed).
        victim = production.start_agent(
            "revoked", seeded["tokens"][0], "--max-steps-per-second", "1"
        )
        production.start_agent("keeper", seeded["tokens"][1])
        wait_registered(production, "revoked", "keeper")
    lease_id, unit_id = production.wait_for(
        "the victim to hold a lease",
        lambda: production.query(
            "SELECT l.id, l.unit_id FROM training_lease l JOIN donors_agent a "
            "ON l.agent_id = a.id WHERE a.name = 'revoked' AND l.status = 'active'"
        ),
        120,
    )[0]

    # Execute
    prefix = seeded["tokens"][0][:10]
    control(production, "revoke", prefix)
    revoked_at = time.monotonic()

    # Assert: the socket closed within 2 s (the consumer marks the agent disconnected)
    while agent_row(production, "revoked")[0] and time.monotonic() - revoked_at < 2.0:
        time.sleep(0.05)
    assert not agent_row(production, "revoked")[0], production.logs()
    assert victim.wait(timeout=60) == EXIT_FATAL
    assert "rejected the token" in log_of(production, "revoked")
    (status,) = production.query("SELECT status FROM training_lease WHERE id = %s", [lease_id])[0]
    assert status == "returned"
    production.wait_for(
        "the unit to be reissued to the other agent",
        lambda: production.query(
            "SELECT 1 FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "WHERE l.unit_id = %s AND a.name = 'keeper'",
            [unit_id],
        ),
        60,
    )
    assert agent_row(production, "revoked")[1] == 0
    control(production, "cancel", job_id)
    production.kill_agent("keeper")


def test_a_banned_agent_is_cut_off_and_neither_its_name_nor_a_new_one_gets_back_in(
    production: Stack, tmp_path: Path
) -> None:
    # Prepare
    seeded = production.seed(target_accuracy=1.0, budget_seconds=120, name="digits-ban")
    job_id = seeded["job_id"]
    with held(production, job_id):
        banned = production.start_agent("banned", seeded["token"])
        wait_registered(production, "banned")
    production.wait_for(
        "the agent to hold a lease",
        lambda: production.query(
            "SELECT 1 FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "WHERE a.name = 'banned' AND l.status = 'active'"
        ),
        120,
    )

    # Execute
    control(production, "ban", "banned", "--reason", "operator test")
    banned_at = time.monotonic()

    # Assert: cut off at once
    while agent_row(production, "banned")[0] and time.monotonic() - banned_at < 2.0:
        time.sleep(0.05)
    assert not agent_row(production, "banned")[0], production.logs()
    assert banned.wait(timeout=60) == EXIT_FATAL
    assert "operator test" in log_of(production, "banned")
    assert leases_of(production, job_id, "active") == 0

    # Assert: a second socket under the same name, and a new name on the token, are refused
    again = production.start_agent("banned-again", seeded["token"], "--name", "banned")
    fresh = production.start_agent("fresh-name", seeded["token"])
    assert again.wait(timeout=120) == EXIT_FATAL
    assert fresh.wait(timeout=120) == EXIT_FATAL
    assert "banned" in log_of(production, "fresh-name")
    pushes = production.query(
        "SELECT COUNT(*) FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
        "WHERE a.name = 'fresh-name'"
    )[0][0]
    assert pushes == 0
    control(production, "cancel", job_id)
