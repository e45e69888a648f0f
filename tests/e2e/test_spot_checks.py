"""Spot checks over real sockets: a worker replays a random push round of agents' leases.

An honest agent process passes every check. An agent process that fakes its gradients
(``rogue_agent.py --mode random``) fails its first one, is banned by the worker's verdict,
and its socket is closed; so is one that computes the first round of each lease honestly
and fakes the rest (``--mode late``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .stack import FAST_LEASES, Stack, running, start_rogue_agent

pytestmark = [pytest.mark.e2e, pytest.mark.services]


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("spot-checks"))
    with running("production", workdir, **FAST_LEASES, UNIT_TARGET_SECONDS="3") as stack:
        yield stack


def checks(stack: Stack, job_id: str, agent: str) -> dict[str, int]:
    rows = stack.query(
        "SELECT s.status, COUNT(*) FROM training_spotcheck s JOIN donors_agent a "
        "ON s.agent_id = a.id WHERE s.job_id = %s AND a.name = %s GROUP BY s.status",
        [job_id, agent],
    )
    return {status: count for status, count in rows}


def test_an_honest_agent_passes_its_spot_checks_and_a_faking_one_is_banned(
    production: Stack,
) -> None:
    # Prepare: every lease is checked, so both agents are checked on their first unit. The
    # job has no time budget: it trains until the test has seen its checks (on a busy
    # machine a 40 s budget ended before the honest agent's second lease was checked).
    seeded = production.seed(
        target_accuracy=1.0,
        name="digits-spot",
        tokens=3,
        # Fetches every step and pushes every 4: rounds load new weights midway, and the
        # replay must follow their loads.
        n_push=4,
        n_fetch=1,
        spot_check_fraction=1.0,
    )
    job_id = seeded["job_id"]
    honest_token, rogue_token, late_token = seeded["tokens"]
    # Execute
    production.start_agent("honest", honest_token)
    fakers = {
        "faker": start_rogue_agent(production, "faker", rogue_token, "random"),
        # Honest through each lease's whole first round (n_push steps), so only a replay of
        # a later round can catch it (leases are short now: 5 rounds, round 0 was 1 in 5).
        "late-faker": start_rogue_agent(
            production, "late-faker", late_token, "late", honest_steps=4
        ),
    }
    # Assert: each faker is banned by a failed check and its process ends.
    for name, proc in fakers.items():
        production.wait_for(
            f"{name} to be banned",
            lambda name=name: production.query(
                "SELECT 1 FROM donors_agent WHERE name = %s AND banned_at IS NOT NULL", [name]
            ),
            timeout=120,
        )
        (reason,) = production.query("SELECT ban_reason FROM donors_agent WHERE name = %s", [name])[
            0
        ]
        assert "spot check" in reason
        assert proc.wait(timeout=60) != 0, "a banned agent stops"
        assert "banned" in (production.workdir / f"{name}.log").read_text()
    assert (
        production.query(
            "SELECT MAX(s.round) FROM training_spotcheck s JOIN donors_agent a "
            "ON s.agent_id = a.id WHERE a.name = 'late-faker' AND s.status = 'failed'"
        )[0][0]
        > 0
    ), "the late faker is caught on a round after its honest first one"
    production.wait_for(
        "two of the honest agent's checks to pass",
        lambda: checks(production, job_id, "honest").get("passed", 0) >= 2,
        timeout=120,
    )
    assert checks(production, job_id, "faker").get("failed", 0) >= 1
    assert checks(production, job_id, "honest").get("failed", 0) == 0
    assert production.query("SELECT banned_at FROM donors_agent WHERE name = 'honest'") == [(None,)]
    (worst,) = production.query(
        "SELECT MAX(relative_error) FROM training_spotcheck s JOIN donors_agent a "
        "ON s.agent_id = a.id WHERE a.name = 'honest' AND s.status = 'passed'"
    )[0]
    assert worst < 1e-3, "an honest round matches its recomputation to float rounding"
    production.kill_agent("honest")
