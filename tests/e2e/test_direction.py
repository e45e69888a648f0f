"""End to end: an agent pushing against the root gradient is banned by the direction rule,
the honest one is not.

The worker publishes root references through Redis; the push path passes them to
``store.push(reference=...)``, and the agent's tested pushes are judged by their mean cosine
with them (``reputation.points_away``), at the push that makes a ban due. Real daphne,
Celery, PostgreSQL and agent processes on the production path; nobody holds a trusted token.

The attacker is disguised inner product manipulation (``rogue_agent.py --mode disguised``):
a tenth of its own gradient plus noise of the same size, negated. Its pushes are too small
for centred clipping, and 0-25 % of them failed the per-push direction test (measured at the
default learning rate of 0.05, before the test moved to 0.005; opposed pushes
count as clipped), so the clipping rule, at 50 %, cannot ban it before the mean-cosine rule
unless nearly all of its first 20-odd pushes are opposed. The test used a full sign
flipper (``-g``) before: clipping and the per-push test flag about half of those pushes,
and in CI, with the worker slow to publish the first references, the clipping rule banned
it first at its 51st push (23 flagged, too few tested for the direction rule): a race
between two rules, not a test of one.
"""

from __future__ import annotations

import pytest

from downpour.devprocs import manage
from downpour_agent.connection import EXIT_FATAL

from .stack import Stack, held, start_rogue_agent, wait_registered
from .test_robust import agent_row

pytestmark = [pytest.mark.e2e, pytest.mark.services]

#: Direction-tested pushes the attacker may make before its ban. The rule judges at the
#: push that makes a ban due, from 20 tested pushes on; this attacker was banned at its 20th
#: (mean cosines -0.33 and -0.39 against the line's -0.10, two runs beside two CPU hogs, at
#: the job's learning rate of 0.005 below).
#: Pushes untested while the worker lags (references live ``REFERENCE_MAX_AGE_S``) do not
#: count: they are the worker's speed, not the rule's. The bound catches a rule that slips
#: back to needing hundreds of pushes.
MAX_TESTED_TO_BAN = 60


def test_an_ipm_agent_is_banned_by_the_direction_rule_and_the_honest_one_is_not(
    production: Stack,
) -> None:
    # Prepare: Alice's robust job (the form's default), an honest donor and an IPM attacker.
    seeded = production.seed(
        target_accuracy=1.0,
        # Long enough for a slowed machine; the test cancels the job once the ban is in.
        budget_seconds=600,
        data_shards=2,
        name="direction-digits",
        tokens=2,
        robust=True,
        spot_check_fraction=0,  # the direction test alone must catch it
        # A tenth of the default rate. At 0.05, under load (two CPU hogs, or a full CI
        # run), the attacker's mean cosine sat at -0.05 and only the t rule banned it, at
        # its 600th and 817th tested push (4 December). Our reading, not traced: its pushes
        # point away from the root only as far as its batch gradient points along the
        # root's, and by the time late references test them the model has converged and
        # both are mostly noise. At 0.005 the model is still learning when it is judged.
        learning_rate=0.005,
    )
    job_id = seeded["job_id"]
    honest_token, attacker_token = seeded["tokens"]
    with held(production, job_id):
        production.start_agent("honest", honest_token)
        attacker = start_rogue_agent(production, "ipm", attacker_token, "disguised", factor=0.1)
        wait_registered(production, "honest", "ipm")
    # Execute
    production.wait_for(
        "the IPM attacker to be banned",
        lambda: agent_row(production, "ipm").get("banned_at"),
        400,
    )
    # Assert
    ipm = agent_row(production, "ipm")
    assert "against the server's root gradient" in ipm["ban_reason"], ipm
    assert ipm["tested"] <= MAX_TESTED_TO_BAN, ipm
    assert attacker.wait(timeout=60) == EXIT_FATAL
    honest = agent_row(production, "honest")
    margins = {
        "honest": honest["mean_cosine"],
        "ipm": ipm["mean_cosine"],
        "ipm_pushes_at_ban": ipm["pushes"],
        "ipm_tested_at_ban": ipm["tested"],
        "ipm_clipped_at_ban": ipm["clipped"],
    }
    print("direction margins:", margins)
    assert honest["banned_at"] is None, production.logs()
    assert honest["pushes"] > 0
    manage(["control", "cancel", job_id], production.env)
    production.kill_agent("honest")
