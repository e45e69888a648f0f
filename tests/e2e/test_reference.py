"""End to end: a robust job (the form's default) trains with one ordinary agent.

Before the server computed reference gradients, such a job waited for a trusted agent that a
fresh install does not have: it sat "initialising" and the agent idled.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from .stack import Stack, held, running, wait_registered
from .test_robust import agent_row

pytestmark = pytest.mark.e2e


def _default_robust_job_reaches_its_target(stack: Stack) -> None:
    # Prepare: the form's defaults (robust aggregation on), one ordinary (untrusted) agent.
    seeded = stack.seed(target_accuracy=0.9, robust=True, name="robust-default")
    job_id = seeded["job_id"]
    assert stack.query("SELECT COUNT(*) FROM donors_agenttoken WHERE is_trusted")[0][0] == 0
    # Execute
    with held(stack, job_id):
        stack.start_agent("ordinary", seeded["token"])
        wait_registered(stack, "ordinary")
    stack.wait_for(
        "the job to finish",
        lambda: stack.job(job_id)["status"] in ("done", "failed"),
        timeout=240,
    )
    # Assert
    job = stack.job(job_id)
    assert job["status"] == "done", stack.logs()
    assert job["best_accuracy"] >= 0.9
    pushed_by_agent = stack.query(
        "SELECT COALESCE(SUM(l.pushes_accepted), 0) FROM training_lease l "
        "JOIN training_workunit u ON l.unit_id = u.id WHERE u.job_id = %s",
        [job_id],
    )[0][0]
    assert pushed_by_agent > 0
    ordinary = agent_row(stack, "ordinary")
    print("direction margins:", {"ordinary": ordinary["mean_cosine"], "tested": ordinary["tested"]})
    assert ordinary["banned_at"] is None, stack.logs()
    stack.kill_agent("ordinary")


def test_the_default_robust_job_trains_with_one_ordinary_agent_on_the_embedded_path(
    embedded: Stack,
) -> None:
    _default_robust_job_reaches_its_target(embedded)


@pytest.mark.services
def test_the_default_robust_job_trains_with_one_ordinary_agent_on_the_production_path(
    production: Stack,
) -> None:
    _default_robust_job_reaches_its_target(production)


#: A worker's log line for a root reference it published on the push path's request.
PUBLISHED_ON_REQUEST = re.compile(
    r"publish_reference_gradient\[[^\]]+\] succeeded in [\d.]+s: True"
)


@pytest.mark.services
def test_pushes_request_references_between_beats_and_the_worker_answers_each(
    tmp_path: Path,
) -> None:
    # Prepare: requests every 8 versions of shard 0, and flags that outlive the test, so a
    # request after the first goes out only once the worker has lowered the flag; every
    # shard's reference published however the root halves disagree, and kept to the end.
    settings = {
        "REFERENCE_EVERY_VERSIONS": "8",
        "REFERENCE_REQUEST_TTL_S": "600",
        "REFERENCE_MIN_AGREEMENT": "-1",
        "REFERENCE_MAX_AGE_S": "600",
    }
    with running("production", tmp_path, **settings) as stack:
        seeded = stack.seed(
            target_accuracy=1.0, budget_seconds=120, robust=True, name="reference-requests"
        )
        job_id = seeded["job_id"]
        with held(stack, job_id):
            stack.start_agent("ordinary", seeded["token"])
            wait_registered(stack, "ordinary")
        worker_log = tmp_path / "celery-worker.log"

        def published() -> int:
            return len(PUBLISHED_ON_REQUEST.findall(worker_log.read_text(errors="replace")))

        # Execute
        stack.wait_for("three references published on request", lambda: published() >= 3, 240)
        # Assert: the board holds every shard's reference, computed at a version the store
        # has reached, past the first multiple of 8 that asked for one.
        client = redis.Redis.from_url(stack.redis_url)
        prefix = stack.env["STORE_PREFIX"]
        versions = stack.store_versions(job_id)
        read_at = {
            shard: int.from_bytes(value[:8], "little")
            for shard in range(len(versions))
            if (value := client.get(f"{prefix}job:{job_id}:shard:{shard}:refv"))
        }
        assert sorted(read_at) == list(range(len(versions))), (read_at, versions)
        assert all(8 <= read_at[s] <= versions[s] for s in read_at), (read_at, versions)
        stack.end_jobs()
