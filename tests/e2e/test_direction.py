"""End to end: a sign-flipping agent is banned by the direction rule, the honest one is not.

The worker publishes root references through Redis; the push path passes them to
``store.push(reference=...)``, and the agent's tested pushes are judged by their mean cosine
with them (``reputation.points_away``), at the push that makes a ban due. Before that rule,
bans came from clipping flags and took hundreds of store pushes (issue 10, item 16). Real
daphne, Celery, PostgreSQL and agent processes on the production path; nobody holds a
trusted token.
"""

from __future__ import annotations

import pytest

from downpour.devprocs import manage
from downpour_agent.connection import EXIT_FATAL

from .stack import Stack, held, start_rogue_agent, wait_registered
from .test_robust import agent_row

pytestmark = [pytest.mark.e2e, pytest.mark.services]

#: Store pushes (one per shard) the attacker may make before its ban. Issue 10's "within
#: tens of pushes" is measured by bench/attacks.py on its virtual clock (20 for every sign
#: flipper; docs/robustness.md). Here, on a real clock, it was 20 in 3 runs beside a full
#: suite, 131 in CI (judgements then came only every 0.25 s) and 113 on a machine with a
#: CPU hog and the suite: the flipper pushed ~30 times a second against a reference
#: refreshed each second, so its tested pushes come in correlated batches of ~30. The ban
#: reason tells the direction rule from the clipping rule; the bound catches a ban that
#: slips back to hundreds of pushes, as clipping alone took (issue 10 saw bans only after
#: 127-195 clipped pushes).
MAX_PUSHES_TO_BAN = 300


def test_a_sign_flipping_agent_is_banned_by_the_direction_rule_and_the_honest_one_is_not(
    production: Stack,
) -> None:
    # Prepare: Alice's robust job (the form's default), an honest donor and a sign flipper.
    seeded = production.seed(
        target_accuracy=1.0,
        # Long enough for a slowed machine; the test cancels the job once the ban is in.
        budget_seconds=600,
        data_shards=2,
        name="direction-digits",
        tokens=2,
        robust=True,
        spot_check_fraction=0,  # the direction test alone must catch it
    )
    job_id = seeded["job_id"]
    honest_token, attacker_token = seeded["tokens"]
    with held(production, job_id):
        production.start_agent("honest", honest_token)
        attacker = start_rogue_agent(production, "flipper", attacker_token, "signflip")
        wait_registered(production, "honest", "flipper")
    # Execute
    production.wait_for(
        "the sign flipper to be banned",
        lambda: agent_row(production, "flipper").get("banned_at"),
        400,
    )
    # Assert
    flipper = agent_row(production, "flipper")
    assert "against the server's root gradient" in flipper["ban_reason"], flipper
    assert flipper["pushes"] <= MAX_PUSHES_TO_BAN, flipper
    assert attacker.wait(timeout=60) == EXIT_FATAL
    honest = agent_row(production, "honest")
    margins = {
        "honest": honest["mean_cosine"],
        "flipper": flipper["mean_cosine"],
        "flipper_pushes_at_ban": flipper["pushes"],
    }
    print("direction margins:", margins)
    assert honest["banned_at"] is None, production.logs()
    assert honest["pushes"] > 0
    manage(["control", "cancel", job_id], production.env)
    production.kill_agent("honest")
