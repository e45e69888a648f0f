"""End to end: a robust job (the form's default) trains with one ordinary agent.

Before the server computed reference gradients, such a job waited for a trusted agent that a
fresh install does not have: it sat "initialising" and the agent idled.
"""

from __future__ import annotations

import pytest

from .stack import Stack, held, wait_registered

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
