"""Completed versus abandoned leases: unit scale, reliability and the tail of a job."""

from __future__ import annotations

import pytest

from downpour.scheduler import (
    HostRecord,
    TailRule,
    admits_to_tail,
    is_reliable,
    record_outcome,
    reliability,
    remaining_fraction,
    tail_unit_scale,
    unit_scale,
    unit_steps,
)


def test_each_abandonment_halves_the_unit_and_each_completion_doubles_it_back() -> None:
    record = HostRecord()
    record = record_outcome(record, completed=False)
    assert unit_scale(record) == 0.5
    record = record_outcome(record, completed=False)
    assert unit_scale(record) == 0.25
    record = record_outcome(record, completed=True)
    assert unit_scale(record) == 0.5
    record = record_outcome(record, completed=True)
    record = record_outcome(record, completed=True)
    assert unit_scale(record) == 1.0


def test_the_unit_scale_has_a_floor() -> None:
    record = HostRecord.from_outcomes([False] * 20)
    assert unit_scale(record) == 1 / 16
    assert record.abandoned == 20 and record.consecutive_completed == 0


def test_recovery_can_be_slower_than_doubling() -> None:
    record = record_outcome(HostRecord(unit_scale=0.5), True, recovery=1.25)
    assert unit_scale(record) == pytest.approx(0.625)


def test_a_smaller_scale_gives_a_smaller_unit() -> None:
    full = unit_steps(3200.0, 32, 30.0)
    halved = unit_steps(3200.0, 32, 30.0, scale=0.5)
    assert (full, halved) == (3000, 1500)
    assert unit_steps(3200.0, 32, 30.0, scale=0.0001) == 20  # never below min_steps


def test_reliability_is_a_laplace_smoothed_completion_rate() -> None:
    assert reliability(HostRecord()) == 0.5
    assert reliability(HostRecord(completed=8, abandoned=0)) == pytest.approx(0.9)
    assert reliability(HostRecord(completed=3, abandoned=5)) == pytest.approx(0.4)


def test_a_reliable_agent_completes_most_leases_and_recently_several_in_a_row() -> None:
    history = [True] * 10 + [False] + [True] * 3
    assert is_reliable(HostRecord.from_outcomes(history))
    assert not is_reliable(HostRecord.from_outcomes([True] * 10 + [False]))  # just abandoned
    assert not is_reliable(HostRecord.from_outcomes([True, False] * 5 + [True] * 3))
    assert not is_reliable(HostRecord())  # a newcomer proves itself first


def test_only_reliable_agents_get_the_last_units_of_a_job() -> None:
    newcomer, veteran = HostRecord(), HostRecord.from_outcomes([True] * 10)
    rule = TailRule(tail_fraction=0.1)
    assert admits_to_tail(newcomer, 0.5, rule)
    assert not admits_to_tail(newcomer, 0.05, rule)
    assert admits_to_tail(veteran, 0.05, rule)


def test_remaining_fraction_of_a_job_without_budget_is_one() -> None:
    assert remaining_fraction(None, 0) == 1.0
    assert remaining_fraction(1000, 50) == 0.05
    assert remaining_fraction(1000, -10) == 0.0


def test_units_in_a_jobs_tail_are_cut_short() -> None:
    rule = TailRule(tail_fraction=0.1, unit_scale=0.25)
    assert tail_unit_scale(0.5, rule) == 1.0
    assert tail_unit_scale(0.05, rule) == 0.25
    assert unit_steps(3200.0, 32, 30.0, scale=tail_unit_scale(0.05, rule)) == 750
