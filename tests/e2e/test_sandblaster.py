"""End to end, Sandblaster L-BFGS (Dean et al. 2012, section 4.2) on the real stack:
daphne, Celery (the coordinator runs in the worker), PostgreSQL, Redis and agent processes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .stack import FAST_LEASES, Stack, held, running, wait_registered

pytestmark = [pytest.mark.e2e, pytest.mark.services]


@pytest.fixture(scope="module")
def blasted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("sandblaster"))
    # The default claim rate: each completed unit gives its claim back (agents/limits.py).
    with running("production", workdir, **FAST_LEASES) as stack:
        yield stack


@pytest.fixture(autouse=True)
def only_this_tests_job(blasted: Stack) -> None:
    """End the jobs earlier tests left running: the kill test's job, still running, once
    took the slow agent of the backup test, whose own job then never needed a backup."""
    blasted.end_jobs()


def progress(stack: Stack, job_id: str) -> dict[str, Any]:
    row = stack.query(
        "SELECT sandblaster_progress, sandblaster_backups FROM training_job WHERE id = %s",
        [job_id],
    )[0]
    value = row[0] if isinstance(row[0], dict) else {}
    return {**value, "backups": row[1]}


def passes_done(stack: Stack, job_id: str) -> int:
    return int(progress(stack, job_id).get("pass", 0))


def assert_each_pass_applied_once(stack: Stack, job_id: str, shards: int) -> None:
    """Each shard moved one version per finished pass (the coordinator's one write), and
    the answers counted as applied are exactly one per unit and shard of each finished pass,
    plus at most those of the pass still open."""
    done, units = passes_done(stack, job_id), int(progress(stack, job_id)["units"])
    versions = stack.store_versions(job_id)
    assert len(set(versions)) == 1, versions
    stack.wait_for(
        "the consumers' tallies to reach the database",
        lambda: stack.job(job_id)["pushes_accepted"] >= done * units * shards,
        timeout=20,
    )
    time.sleep(3)  # a flush in flight (every 2 s) lands
    accepted = stack.job(job_id)["pushes_accepted"]
    assert done * units * shards <= accepted <= (done + 1) * units * shards


def test_two_agents_train_the_digits_mlp_to_95_percent_with_sandblaster(blasted: Stack) -> None:
    # Prepare: 12 units a pass for 2 agents
    seeded = blasted.seed(
        target_accuracy=0.95,
        budget_seconds=900,
        algorithm="sandblaster",
        sandblaster_units=12,
        name="sandblaster-95",
    )
    job_id = seeded["job_id"]
    with held(blasted, job_id):
        for name in ("blast-a", "blast-b"):
            blasted.start_agent(name, seeded["token"])
        wait_registered(blasted, "blast-a", "blast-b")
    started = time.monotonic()

    # Execute
    blasted.wait_for(
        "the job to finish",
        lambda: blasted.job(job_id)["status"] in ("done", "failed"),
        timeout=900,
    )
    elapsed = time.monotonic() - started

    # Assert
    job = blasted.job(job_id)
    assert job["status"] == "done", blasted.logs()
    assert job["best_accuracy"] >= 0.95
    state = progress(blasted, job_id)
    print(f"sandblaster to 95%: {elapsed:.0f} s, {state}, accuracy {job['best_accuracy']:.3f}")
    assert state["pass"] >= 5 and state["iterations"] >= 3
    agents = blasted.query(
        "SELECT COUNT(DISTINCT agent_id) FROM training_lease l JOIN training_workunit u "
        "ON l.unit_id = u.id WHERE u.job_id = %s",
        [job_id],
    )[0][0]
    assert agents == 2  # both agents took units of the passes
    for name in ("blast-a", "blast-b"):
        blasted.kill_agent(name)


def test_a_kill_mid_pass_loses_nothing_and_applies_nothing_twice(blasted: Stack) -> None:
    # Prepare: the victim is slowed so that it is mid-unit when it dies
    seeded = blasted.seed(
        target_accuracy=1.0,
        budget_seconds=600,
        algorithm="sandblaster",
        sandblaster_units=8,
        name="sandblaster-kill",
        tokens=2,
    )
    job_id = seeded["job_id"]
    with held(blasted, job_id):
        victim = blasted.start_agent(
            "blast-victim", seeded["tokens"][0], "--max-steps-per-second", "1"
        )
        blasted.start_agent("blast-survivor", seeded["tokens"][1])
        wait_registered(blasted, "blast-victim", "blast-survivor")
    blasted.wait_for(
        "the victim to hold a unit of a pass",
        lambda: blasted.query(
            "SELECT l.id FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "JOIN training_workunit u ON l.unit_id = u.id WHERE a.name = 'blast-victim' "
            "AND l.status = 'active' AND u.job_id = %s AND u.pass_number >= 1",
            [job_id],
        ),
        timeout=240,
    )
    before = passes_done(blasted, job_id)

    # Execute: kill -9 mid-unit; the survivor finishes the pass (a backup copy, or the unit
    # reissued when the victim's lease expires)
    os.killpg(victim.pid, 9)
    victim.wait()
    killed_at = time.monotonic()
    blasted.wait_for(
        "three more passes",
        lambda: passes_done(blasted, job_id) >= before + 3,
        timeout=180,
    )
    print(
        f"sandblaster kill: 3 passes {time.monotonic() - killed_at:.1f} s after the kill, "
        f"{progress(blasted, job_id)}"
    )
    blasted.kill_agent("blast-survivor")

    # Assert
    assert_each_pass_applied_once(blasted, job_id, shards=2)
    lost = blasted.query(
        "SELECT COUNT(*) FROM training_workunit WHERE job_id = %s AND pass_number < %s "
        "AND status = 'pending'",
        [job_id, passes_done(blasted, job_id)],
    )[0][0]
    assert lost == 0


def test_backups_finish_a_pass_when_one_agent_is_ten_times_slower(blasted: Stack) -> None:
    # Prepare: one agent throttled to 1 batch a second, ten times or more below the other
    seeded = blasted.seed(
        target_accuracy=1.0,
        budget_seconds=600,
        algorithm="sandblaster",
        sandblaster_units=8,
        name="sandblaster-slow",
        tokens=2,
    )
    job_id = seeded["job_id"]
    with held(blasted, job_id):
        blasted.start_agent("blast-slow", seeded["tokens"][0], "--max-steps-per-second", "1")
        blasted.start_agent("blast-fast", seeded["tokens"][1])
        wait_registered(blasted, "blast-slow", "blast-fast")
    blasted.wait_for("the first pass", lambda: passes_done(blasted, job_id) >= 1, timeout=240)
    blasted.wait_for(
        "the slow agent to take a unit of this job",
        lambda: blasted.query(
            "SELECT l.id FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "JOIN training_workunit u ON l.unit_id = u.id WHERE a.name = 'blast-slow' "
            "AND u.job_id = %s",
            [job_id],
        ),
        timeout=120,
    )
    started, first = time.monotonic(), passes_done(blasted, job_id)

    # Execute
    blasted.wait_for(
        "five passes with the slow agent in them",
        lambda: passes_done(blasted, job_id) >= first + 5,
        timeout=240,
    )
    elapsed = time.monotonic() - started

    # Assert: backup copies were issued, and the slow agent's copies lost the race
    state = progress(blasted, job_id)
    superseded = blasted.query(
        "SELECT COUNT(*) FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
        "JOIN training_workunit u ON l.unit_id = u.id WHERE a.name = 'blast-slow' "
        "AND l.status = 'superseded' AND u.job_id = %s",
        [job_id],
    )[0][0]
    durations = {
        name: blasted.query(
            "SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM "
            "l.ended_at - l.issued_at)) FROM training_lease l JOIN donors_agent a "
            "ON l.agent_id = a.id JOIN training_workunit u ON l.unit_id = u.id "
            "WHERE a.name = %s AND u.job_id = %s AND l.status IN ('completed', 'superseded')",
            [name, job_id],
        )[0][0]
        for name in ("blast-slow", "blast-fast")
    }
    print(
        f"sandblaster 10x slower: 5 passes in {elapsed:.1f} s, {state}, {superseded} slow "
        f"copies superseded, median lease s {durations}"
    )
    assert state["backups"] >= 1
    assert superseded >= 1
    for name in ("blast-slow", "blast-fast"):
        blasted.kill_agent(name)
