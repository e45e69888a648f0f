"""pick_job with a decaying window: weighted shares, released shares, small demands."""

from __future__ import annotations

from downpour.scheduler import FairWindow, JobLoad, pick_job, rank_jobs

ALICE, BOB, CAROL = 1, 2, 3
WINDOW = FairWindow(time_constant_s=120, horizon_s=30)


def load(
    job: str,
    owner: int,
    recent: float,
    flight: int = 0,
    *,
    weight: float = 1.0,
    order: int = 0,
    budget: int | None = None,
    done: int = 0,
    active_s: float | None = None,
) -> JobLoad:
    return JobLoad(
        job, owner, weight, done, flight, order, recent, active_s=active_s, budget_samples=budget
    )


def test_it_serves_the_researcher_with_least_recent_compute_per_weight() -> None:
    jobs = [
        load("a", ALICE, 1000),
        load("b", BOB, 1000),
        load("c", CAROL, 1500, weight=2.0),  # 750 per unit of weight
    ]
    assert pick_job(jobs, window=WINDOW) == "c"


def test_recent_compute_decides_not_all_time_compute() -> None:
    # Alice did far more long ago; recently she did less than Bob.
    jobs = [load("a", ALICE, 100, done=10**9), load("b", BOB, 500, done=10)]
    assert pick_job(jobs, window=WINDOW) == "a"
    assert pick_job(jobs) == "b"  # the all-time rule of the first version


def test_in_flight_work_counts_towards_the_share() -> None:
    jobs = [load("a", ALICE, 100, flight=900), load("b", BOB, 500)]
    assert pick_job(jobs, window=WINDOW) == "b"


def test_work_of_a_researchers_finished_jobs_still_counts_for_them() -> None:
    jobs = [load("a", ALICE, 500), load("b2", BOB, 0)]
    # Bob's b1 just finished after much recent work.
    window = FairWindow(owner_recent={ALICE: 500, BOB: 2000})
    assert pick_job(jobs, window=window) == "a"


def test_a_finished_job_is_simply_left_out_and_its_share_goes_to_the_others() -> None:
    jobs = [load("a", ALICE, 1000), load("b", BOB, 200), load("c", CAROL, 1500, weight=2.0)]
    assert pick_job(jobs, window=WINDOW) == "b"
    without_bob = [j for j in jobs if j.owner_id != BOB]
    assert pick_job(without_bob, window=WINDOW) == "c"


def test_a_researcher_back_from_a_pause_is_not_owed_the_time_away() -> None:
    # Alice: 4000 samples over tau + horizon = 150 s, 26.7/s. Bob came back 10 s ago:
    # 1500 in flight over 9.6 + 30 s is 37.9/s, above Alice.
    jobs = [load("a", ALICE, 4000), load("b", BOB, 0, flight=1500)]
    window = FairWindow(time_constant_s=120, horizon_s=30, owner_active_s={BOB: 10})
    assert pick_job(jobs, window=window) == "a"
    # Counted over the whole window instead, Bob would look starved.
    assert pick_job(jobs, window=FairWindow(time_constant_s=120, horizon_s=30)) == "b"


def test_a_job_about_to_finish_goes_before_its_siblings() -> None:
    # b2 needs 10 more samples and is below its equal split; b1 is further below it.
    jobs = [
        load("b1", BOB, 100, order=0),
        load("b2", BOB, 600, order=1, budget=1_000_010, done=1_000_000),
        load("b3", BOB, 1300, order=2),
    ]
    assert rank_jobs(jobs, window=WINDOW) == ["b2", "b1", "b3"]


def test_a_job_in_its_tail_goes_first_among_its_researchers_jobs_even_if_ahead() -> None:
    # b2 has done more than b1 recently, but has 1% of its budget left: finish it.
    jobs = [
        load("b1", BOB, 100, order=0),
        load("b2", BOB, 1000, order=1, budget=1_000_000, done=990_000),
    ]
    assert rank_jobs(jobs, window=WINDOW) == ["b2", "b1"]
    assert rank_jobs(jobs, window=WINDOW, tail_fraction=0.0) == ["b1", "b2"]


def test_a_researcher_ahead_of_their_share_gets_no_priority_for_a_finishing_job() -> None:
    jobs = [
        load("a", ALICE, 100),
        load("b2", BOB, 1000, budget=1_000_000, done=990_000),
    ]
    assert rank_jobs(jobs, window=WINDOW) == ["a", "b2"]


def test_a_fully_leased_budget_takes_no_new_unit_but_still_counts() -> None:
    jobs = [
        load("b1", BOB, 0, flight=1000, budget=1000),
        load("a", ALICE, 600),
    ]
    assert rank_jobs(jobs, window=WINDOW) == ["a"]


def test_ineligible_jobs_are_skipped_but_keep_their_place_in_the_accounts() -> None:
    jobs = [load("a", ALICE, 0), load("b", BOB, 100), load("c", CAROL, 150, weight=2.0)]
    assert pick_job(jobs, window=WINDOW) == "a"
    assert pick_job(jobs, window=WINDOW, eligible={"b", "c"}) == "c"
    assert pick_job(jobs, window=WINDOW, eligible=set()) is None


def test_within_a_researcher_jobs_share_equally() -> None:
    jobs = [
        load("c1", CAROL, 800, weight=2.0, order=0),
        load("c2", CAROL, 300, weight=2.0, order=1),
        load("c3", CAROL, 900, weight=2.0, order=2),
    ]
    assert rank_jobs(jobs, window=WINDOW) == ["c2", "c1", "c3"]


def test_a_job_started_recently_is_measured_over_its_own_time() -> None:
    # b3 started 5 s ago: 1000 in flight over 4.9 + 30 s is 28.6/s; b1 does 2000 / 150 s.
    jobs = [load("b1", BOB, 2000, order=0), load("b3", BOB, 0, flight=1000, order=1, active_s=5)]
    assert pick_job(jobs, window=WINDOW) == "b1"
    over_the_whole_window = [jobs[0], load("b3", BOB, 0, flight=1000, order=1)]
    assert pick_job(over_the_whole_window, window=WINDOW) == "b3"
