"""Weighted max-min shares, Jain's index and the windows the policy measures over."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from downpour.scheduler import (
    DecayingTotals,
    active_seconds,
    decayed_span,
    jain_index,
    runnable_since,
    weighted_max_min_shares,
)

ALICE, BOB, CAROL = "alice", "bob", "carol"


def test_equal_weights_and_unbounded_demands_split_capacity_equally() -> None:
    shares = weighted_max_min_shares({ALICE: math.inf, BOB: math.inf}, {ALICE: 1, BOB: 1}, 10)
    assert shares == pytest.approx({ALICE: 5, BOB: 5})


def test_weights_one_one_two_get_a_quarter_a_quarter_and_a_half() -> None:
    demands = {ALICE: math.inf, BOB: math.inf, CAROL: math.inf}
    shares = weighted_max_min_shares(demands, {ALICE: 1, BOB: 1, CAROL: 2}, 100)
    assert shares == pytest.approx({ALICE: 25, BOB: 25, CAROL: 50})


def test_a_small_demand_is_met_and_the_rest_is_shared_by_weight() -> None:
    demands = {ALICE: 10, BOB: math.inf, CAROL: math.inf}
    shares = weighted_max_min_shares(demands, {ALICE: 1, BOB: 1, CAROL: 2}, 100)
    assert shares == pytest.approx({ALICE: 10, BOB: 30, CAROL: 60})


def test_demands_below_capacity_are_all_met_and_nothing_is_invented() -> None:
    shares = weighted_max_min_shares({ALICE: 3, BOB: 4}, {ALICE: 1, BOB: 2}, 100)
    assert shares == pytest.approx({ALICE: 3, BOB: 4})


def test_a_finished_job_releases_its_share_at_once() -> None:
    weights = {ALICE: 1, BOB: 1, CAROL: 2}
    before = weighted_max_min_shares({k: math.inf for k in weights}, weights, 100)
    # Bob's last job finished: he is no longer in the input.
    after = weighted_max_min_shares({ALICE: math.inf, CAROL: math.inf}, weights, 100)
    assert before[BOB] == pytest.approx(25)
    assert after == pytest.approx({ALICE: 100 / 3, CAROL: 200 / 3})


def test_zero_capacity_gives_nobody_anything() -> None:
    assert weighted_max_min_shares({ALICE: 5}, {ALICE: 1}, 0) == {ALICE: 0.0}


@pytest.mark.parametrize(
    ("demands", "weights", "capacity"),
    [({ALICE: -1.0}, {ALICE: 1.0}, 1.0), ({ALICE: 1.0}, {ALICE: 0.0}, 1.0), ({}, {}, -1.0)],
)
def test_it_refuses_negative_demands_zero_weights_and_negative_capacity(
    demands: dict[str, float], weights: dict[str, float], capacity: float
) -> None:
    with pytest.raises(ValueError):
        weighted_max_min_shares(demands, weights, capacity)


demand_values = st.one_of(st.floats(0, 1e6), st.just(math.inf))


@given(
    st.dictionaries(
        st.integers(0, 6), st.tuples(demand_values, st.floats(0.1, 10)), min_size=1, max_size=6
    ),
    st.floats(0, 1e6),
)
def test_shares_are_weighted_max_min_fair(
    table: dict[int, tuple[float, float]], capacity: float
) -> None:
    demands = {k: d for k, (d, _) in table.items()}
    weights = {k: w for k, (_, w) in table.items()}
    shares = weighted_max_min_shares(demands, weights, capacity)
    assert sum(shares.values()) == pytest.approx(min(capacity, sum(demands.values())), rel=1e-9)
    for k in shares:
        assert -1e-9 <= shares[k] <= demands[k] * (1 + 1e-9) + 1e-9
    # Nobody short of their demand has less per unit of weight than anyone else.
    for i in shares:
        if shares[i] < demands[i] * (1 - 1e-9):
            for j in shares:
                assert shares[j] / weights[j] <= shares[i] / weights[i] * (1 + 1e-9) + 1e-9


def test_jain_index_is_one_when_allocations_follow_the_weights() -> None:
    assert jain_index({ALICE: 25, BOB: 25, CAROL: 50}, {ALICE: 1, BOB: 1, CAROL: 2}) == 1.0


def test_jain_index_is_one_over_n_when_one_key_gets_everything() -> None:
    assert jain_index({ALICE: 9, BOB: 0, CAROL: 0}) == pytest.approx(1 / 3)


def test_jain_index_of_a_known_split() -> None:
    # x = (1, 2): (1 + 2)^2 / (2 * (1 + 4)) = 0.9
    assert jain_index({ALICE: 1, BOB: 2}) == pytest.approx(0.9)
    # Weighted: Bob's 2 over weight 2 is the same as Alice's 1.
    assert jain_index({ALICE: 1, BOB: 2}, {ALICE: 1, BOB: 2}) == pytest.approx(1.0)


def test_jain_index_of_nothing_is_one() -> None:
    assert jain_index({}) == 1.0
    assert jain_index({ALICE: 0, BOB: 0}) == 1.0


def test_decaying_totals_halve_after_tau_ln_2() -> None:
    totals = DecayingTotals(100)
    totals.add(0, ALICE, 8)
    assert totals.value(ALICE, 100 * math.log(2)) == pytest.approx(4)
    totals.add(100 * math.log(2), ALICE, 4)
    assert totals.values(100 * math.log(2)) == pytest.approx({ALICE: 8})


def test_decaying_totals_with_no_memory_are_always_zero() -> None:
    totals = DecayingTotals(0)
    totals.add(0, ALICE, 8)
    assert totals.value(ALICE, 0) == 0.0


def test_the_decayed_span_is_what_a_steady_rate_adds_up_to() -> None:
    totals, rate, tau = DecayingTotals(50), 3.0, 50.0
    for t in range(200):
        totals.add(t + 1, ALICE, rate)  # rate per second for 200 s
    assert totals.value(ALICE, 200) == pytest.approx(rate * decayed_span(200, tau), rel=0.02)
    assert decayed_span(math.inf, tau) == pytest.approx(tau)
    assert decayed_span(10, 0) == 0.0


def test_runnable_since_merges_overlapping_jobs_and_restarts_after_a_gap() -> None:
    # b1 ran 0-100, b2 50-150, then nothing until b3 at 200.
    intervals = [(0.0, 100.0), (50.0, 150.0), (200.0, None)]
    assert runnable_since(intervals, 120) == 0.0
    assert runnable_since(intervals, 170) is None
    assert runnable_since(intervals, 250) == 200.0
    assert runnable_since([(0.0, 100.0), (100.0, None)], 150) == 0.0  # touching intervals


def test_active_seconds_is_clipped_to_the_window() -> None:
    assert active_seconds(None, 100, 60) == 0.0
    assert active_seconds(70, 100, 60) == 30
    assert active_seconds(0, 100, 60) == 60
