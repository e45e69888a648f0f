"""kill -9 of the server: agents reconnect, the store comes back, training finishes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .stack import FAST_LEASES, Stack, held, running, wait_registered

pytestmark = pytest.mark.e2e


@pytest.fixture
def embedded_fast_checkpoints(tmp_path: Path) -> Iterator[Stack]:
    with running(
        "embedded",
        tmp_path,
        **FAST_LEASES,
        UNIT_TARGET_SECONDS="5",
        CHECKPOINT_INTERVAL_S="2",
    ) as stack:
        yield stack


def test_the_embedded_store_restores_its_last_checkpoint_after_a_kill_9(
    embedded_fast_checkpoints: Stack,
) -> None:
    # Prepare: a job that runs for a while, two agents, a first checkpoint.
    stack = embedded_fast_checkpoints
    seeded = stack.seed(target_accuracy=1.0, budget_seconds=40, name="restart", tokens=2)
    job_id = seeded["job_id"]
    with held(stack, job_id):
        stack.start_agent("agent-a", seeded["tokens"][0])
        stack.start_agent("agent-b", seeded["tokens"][1])
        wait_registered(stack, "agent-a", "agent-b")
    stack.wait_for(
        "a checkpoint with pushes in it",
        lambda: (
            stack.query("SELECT COUNT(*) FROM training_checkpoint WHERE job_id = %s", [job_id])[0][
                0
            ]
            >= 2
            and stack.job(job_id)["pushes_accepted"] > 0
        ),
    )

    # Execute: the server dies with its in-memory store; a new one starts on the same port.
    stack.kill_server()
    (newest,) = stack.query(
        "SELECT versions FROM training_checkpoint WHERE job_id = %s ORDER BY created_at DESC",
        [job_id],
    )[0]
    stack.start_server()

    # Assert: the store came back from the newest checkpoint and training went on.
    stack.wait_for(
        "the job to finish", lambda: stack.job(job_id)["status"] in ("done", "failed"), 180
    )
    # Each agent reconnects after its backoff, which may end after the job does.
    wait_registered(stack, "agent-a", "agent-b", times=2)
    assert "restored checkpoint" in (stack.workdir / "server.log").read_text()
    assert str(newest).replace(" ", "") in (stack.workdir / "server.log").read_text().replace(
        " ", ""
    )
    job = stack.job(job_id)
    assert job["status"] == "done" and job["best_accuracy"] >= 0.9


@pytest.mark.services
def test_agents_carry_on_after_a_kill_9_of_the_production_server(production: Stack) -> None:
    seeded = production.seed(target_accuracy=1.0, budget_seconds=40, name="restart-prod", tokens=2)
    job_id = seeded["job_id"]
    with held(production, job_id):
        production.start_agent("agent-c", seeded["tokens"][0])
        production.start_agent("agent-d", seeded["tokens"][1])
        wait_registered(production, "agent-c", "agent-d")
    production.wait_for("pushes", lambda: production.job(job_id)["pushes_accepted"] > 0)
    before = sum(production.store_versions(job_id))

    production.kill_server()
    # Redis kept the state: read with the server dead (a finished job's store is freed, so
    # it can't be read at the end).
    kept = sum(production.store_versions(job_id))
    pushes_at_kill = production.job(job_id)["pushes_accepted"]
    production.start_server()

    production.wait_for(
        "the job to finish",
        lambda: production.job(job_id)["status"] in ("done", "failed"),
        180,
    )
    job = production.job(job_id)
    assert kept >= before > 0
    assert job["pushes_accepted"] > pushes_at_kill  # training went on after the restart
    assert job["status"] == "done" and job["best_accuracy"] >= 0.9
    wait_registered(production, "agent-c", "agent-d", times=2)
    for name in ("agent-c", "agent-d"):
        production.kill_agent(name)
