"""A real agent behind an emulated ``cable`` link trains on the production stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import netlink
from tests.e2e.stack import held, wait_registered
from tests.harness import Deployment

pytestmark = [pytest.mark.services, pytest.mark.e2e]


@pytest.fixture
def production(tmp_path: Path) -> Iterator[Deployment]:
    stack = Deployment("production", tmp_path, links=True, UNIT_TARGET_SECONDS="5")
    try:
        yield stack.start()
    finally:
        stack.stop()


def test_an_agent_behind_a_cable_link_registers_and_trains_the_digits(
    production: Deployment,
) -> None:
    # Prepare
    seeded = production.seed(target_accuracy=0.9, learning_rate=0.02, name="digits-cable")
    # Execute
    with held(production, seeded["job_id"]):
        production.start_agent("donor", seeded["token"], link="cable")
        wait_registered(production, "donor")
    production.wait_for(
        "the job to finish",
        lambda: production.job(seeded["job_id"])["status"] in ("done", "failed"),
        timeout=240,
    )
    # Assert: trained, and every byte of it crossed the shaped link both ways.
    job = production.job(seeded["job_id"])
    assert job["status"] == "done", production.logs()
    assert job["best_accuracy"] >= 0.9
    assert job["pushes_accepted"] > 0
    link = production.agent_links["donor"]
    model_bytes = 4 * (64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10)
    sent = link.qdisc_bytes()
    assert sent["down"] > 5 * model_bytes and sent["up"] > 5 * model_bytes, sent
    (peers,) = production.query(
        "SELECT COUNT(*) FROM training_lease l JOIN training_workunit u ON l.unit_id = u.id "
        "WHERE u.job_id = %s",
        [seeded["job_id"]],
    )[0]
    assert peers >= 1
    production.kill_agent("donor")
    # The agent's link goes with it.
    assert link.namespace not in netlink.namespaces()
