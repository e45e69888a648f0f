"""Units from measured work, leases per agent and shares of a budget (``scheduler.sizing``)."""

from __future__ import annotations

import pytest

from downpour.scheduler import (
    REFERENCE_FLOPS_PER_SAMPLE,
    SizingRule,
    may_take_lease,
    measured_unit_steps,
    reference_rate,
    share_cap_steps,
    unit_steps,
    update_measured_rate,
)

RULE = SizingRule()
TARGET_S = 30.0


def sized(measured: float | None, batch: int = 32, scale: float = 1.0) -> int:
    """The steps the adapter gives: ``unit_steps`` on the measured rate, then the first unit."""
    steps = unit_steps(measured, batch, TARGET_S, scale=scale)
    return measured_unit_steps(measured, steps, scale, RULE)


def test_an_agent_with_no_measured_rate_gets_the_small_first_unit_whatever_it_claims() -> None:
    # The claim (1e9 samples/s) is not an input at all: only a measured rate is.
    assert sized(None) == RULE.first_unit_steps == 20
    assert sized(None, scale=0.5) == 10


def test_with_a_measured_rate_a_unit_takes_about_the_target_time() -> None:
    rate = update_measured_rate(None, samples=96_000, seconds=30.0)
    steps = sized(rate)
    assert steps * 32 / rate == pytest.approx(TARGET_S, rel=0.01)


def test_the_measured_rate_is_an_average_and_a_single_burst_grows_it_at_most_fourfold() -> None:
    rate = update_measured_rate(None, samples=3_000, seconds=1.0)
    assert rate == 3_000
    assert update_measured_rate(rate, samples=1_000, seconds=1.0) == pytest.approx(2_000)
    # A lease "done" at 1e9 samples/s moves the rate half way to 4x, not to 1e9.
    burst = update_measured_rate(rate, samples=1e9, seconds=1.0)
    assert burst == pytest.approx(0.5 * 3_000 + 0.5 * 4 * 3_000)


def test_a_lease_shorter_than_a_second_is_measured_as_a_second() -> None:
    assert update_measured_rate(None, samples=640, seconds=0.001) == 640


def test_a_model_costlier_than_the_reference_is_measured_in_reference_samples() -> None:
    costly = 10 * REFERENCE_FLOPS_PER_SAMPLE
    assert reference_rate(100.0, 1.0, costly) == pytest.approx(1_000.0)
    assert reference_rate(100.0, 1.0, REFERENCE_FLOPS_PER_SAMPLE / 10) == 100.0
    # ...and unit_steps scales it back: a unit of the costly model still takes the target.
    steps = unit_steps(1_000.0, 1, TARGET_S, costly)
    assert steps / 100.0 == pytest.approx(TARGET_S, rel=0.01)


def test_an_agent_holds_at_most_two_leases() -> None:
    assert may_take_lease(0) and may_take_lease(1)
    assert not may_take_lease(2)
    assert not may_take_lease(80)


def test_an_agent_holding_nothing_may_take_a_quarter_of_what_is_left() -> None:
    assert share_cap_steps(32, 500_000, 0) == 500_000 // 4 // 32


def test_an_agent_holding_its_quarter_may_take_no_more_of_the_job() -> None:
    assert share_cap_steps(32, 500_000, 125_000) == 0
    assert share_cap_steps(32, 500_000, 100_000) == 25_000 // 32


def test_the_last_step_of_a_job_may_go_to_an_agent_holding_none_of_it() -> None:
    assert share_cap_steps(32, 32, 0) == 1


def test_a_job_without_a_sample_budget_has_no_share_cap() -> None:
    assert share_cap_steps(32, None, 1e12) is None
