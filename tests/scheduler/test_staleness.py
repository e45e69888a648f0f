"""Staleness: step size, push cadence, admission, warm start and the histogram."""

from __future__ import annotations

import pytest

from downpour.scheduler import (
    StalenessHistogram,
    WarmStart,
    admits_replica,
    expected_staleness,
    push_every_steps,
    push_interval_s,
)

CHARLIE, DANA = "charlie-pc", "dana-pc"


def test_fast_and_slow_agents_push_about_equally_often() -> None:
    slow = push_every_steps(50.0, 32, interval_s=2.0)
    fast = push_every_steps(5000.0, 32, interval_s=2.0)
    assert (slow, fast) == (3, 312)
    assert push_interval_s(slow, 32, 50.0) == pytest.approx(1.92)
    assert push_interval_s(fast, 32, 5000.0) == pytest.approx(2.0, rel=0.01)
    assert push_every_steps(None, 32) == 1
    assert push_every_steps(5000.0, 32, max_steps=100) == 100


def test_expected_staleness_is_the_others_pushes_during_ones_interval() -> None:
    # 40 other replicas each pushing every 2 s, and this one every 2 s: about 40.
    assert expected_staleness(others_push_rate=40 / 2.0, push_interval=2.0) == 40


def test_a_replica_is_admitted_while_its_p95_staleness_fits_the_bound() -> None:
    assert admits_replica(0.0, 0)  # an empty job takes anyone
    assert admits_replica(50.0, 64)  # 50 + 1.645 * sqrt(50) = 61.6
    assert not admits_replica(55.0, 64)  # 67.2
    assert not admits_replica(14.0, 16)


def test_warm_start_gives_the_job_to_one_agent_for_its_first_pushes() -> None:
    warm = WarmStart(k_pushes=20)
    assert warm.allows(CHARLIE, holder_id=None, pushes_applied=0)
    assert warm.allows(CHARLIE, holder_id=CHARLIE, pushes_applied=5)
    assert not warm.allows(DANA, holder_id=CHARLIE, pushes_applied=19)
    assert warm.allows(DANA, holder_id=CHARLIE, pushes_applied=20)


def test_warm_start_off_lets_everyone_in() -> None:
    assert WarmStart().allows(DANA, holder_id=CHARLIE, pushes_applied=0)


def test_histogram_percentiles_use_the_nearest_rank() -> None:
    hist = StalenessHistogram()
    hist.add_all(range(1, 101))  # 1..100
    assert (hist.p50, hist.p95, hist.percentile(100)) == (50, 95, 100)
    assert hist.mean() == pytest.approx(50.5)


def test_histogram_from_store_counts_and_merged() -> None:
    hist = StalenessHistogram({0: 90, 7: 10})
    assert (hist.p50, hist.p95, hist.total) == (0, 7, 100)
    other = StalenessHistogram({3: 100})
    hist.merge(other)
    assert (hist.total, hist.p50) == (200, 3)


def test_an_empty_histogram_reports_zero() -> None:
    assert StalenessHistogram().p95 == 0
