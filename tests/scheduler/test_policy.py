from __future__ import annotations

from downpour.scheduler import JobLoad, pick_job, unit_steps


def load(
    job: str, owner: int, weight: float, done: int, flight: int = 0, order: int = 0
) -> JobLoad:
    return JobLoad(job, owner, weight, done, flight, order)


def test_it_picks_nothing_when_no_job_is_runnable() -> None:
    assert pick_job([]) is None


def test_it_serves_the_researcher_furthest_below_their_weighted_share() -> None:
    jobs = [load("a", 1, 1.0, 1000), load("b", 2, 2.0, 1500)]
    # Researcher 2 has 750 per unit of weight, researcher 1 has 1000.
    assert pick_job(jobs) == "b"


def test_in_flight_work_counts_towards_a_share() -> None:
    jobs = [load("a", 1, 1.0, 100, flight=900), load("b", 2, 1.0, 500)]
    assert pick_job(jobs) == "b"


def test_within_a_researcher_the_job_with_least_compute_goes_first() -> None:
    jobs = [load("old", 1, 1.0, 500, order=0), load("new", 1, 1.0, 10, order=1)]
    assert pick_job(jobs) == "new"


def test_ties_go_to_the_oldest_job() -> None:
    jobs = [load("second", 1, 1.0, 0, order=1), load("first", 1, 1.0, 0, order=0)]
    assert pick_job(jobs) == "first"


def test_a_unit_lasts_about_the_target_time_on_the_agent() -> None:
    assert unit_steps(3200.0, 32, 30.0) == 3000


def test_an_agent_of_unknown_speed_gets_a_small_unit() -> None:
    assert unit_steps(None, 32, 30.0) == 20


def test_a_costlier_model_gets_fewer_steps() -> None:
    cheap = unit_steps(3200.0, 32, 30.0, flops_per_sample=1000)
    costly = unit_steps(3200.0, 32, 30.0, flops_per_sample=10_000_000)
    assert costly < cheap
    assert costly >= 20


def test_an_infinite_reported_speed_gets_the_largest_unit_not_a_crash() -> None:
    assert unit_steps(float("inf"), 32, 30.0) == 20_000
    assert unit_steps(1e308, 32, 30.0) == 20_000
