"""Robust jobs warming up go to trusted agents only (downpour.scheduler.trust)."""

from __future__ import annotations

from downpour.scheduler import admits_during_warmup, warmup_eligible

# Alice's robust job "alice-robust" is warming up; Bob's "bob-plain" has no clipping.


def test_an_untrusted_agent_is_kept_out_of_a_job_warming_up() -> None:
    assert not admits_during_warmup(agent_trusted=False, warming_up=True)
    assert admits_during_warmup(agent_trusted=True, warming_up=True)
    assert admits_during_warmup(agent_trusted=False, warming_up=False)


def test_an_untrusted_agent_gets_the_other_jobs() -> None:
    eligible = warmup_eligible({"alice-robust", "bob-plain"}, {"alice-robust"}, False)

    assert eligible == {"bob-plain"}


def test_an_untrusted_agent_gets_nothing_when_only_a_job_warming_up_runs() -> None:
    assert warmup_eligible(["alice-robust"], {"alice-robust"}, agent_trusted=False) == set()


def test_a_trusted_agent_goes_to_the_jobs_warming_up_first() -> None:
    eligible = warmup_eligible({"alice-robust", "bob-plain"}, {"alice-robust"}, True)

    assert eligible == {"alice-robust"}


def test_once_every_job_is_warm_everyone_gets_every_eligible_job() -> None:
    jobs = {"alice-robust", "bob-plain"}

    assert warmup_eligible(jobs, set(), agent_trusted=False) == jobs
    assert warmup_eligible(jobs, set(), agent_trusted=True) == jobs


def test_a_job_warming_up_that_other_rules_refuse_stays_refused() -> None:
    # Warm start or the tail rule already kept the agent out of Alice's job.
    assert warmup_eligible({"bob-plain"}, {"alice-robust"}, agent_trusted=True) == {"bob-plain"}
