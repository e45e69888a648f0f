"""Sizing, fitting and splitting units for agents of different speeds."""

from __future__ import annotations

from downpour.scheduler import fits_agent, split_unit, unit_steps


def test_a_fast_agents_unit_does_not_fit_a_slow_agent() -> None:
    fast_unit = unit_steps(5000.0, 32, 30.0) * 32  # 150 000 samples, 30 s at 5000/s
    assert fits_agent(fast_unit, 5000.0, 30.0)
    assert fits_agent(fast_unit, 2500.0, 30.0)  # 60 s: within 2 x T
    assert not fits_agent(fast_unit, 50.0, 30.0)  # 50 minutes
    assert not fits_agent(fast_unit, None, 30.0)


def test_a_slow_agent_takes_a_piece_of_a_fast_agents_unit_and_the_rest_stays_queued() -> None:
    assert split_unit(4687, 47) == (47, 4640)


def test_an_agent_takes_a_unit_within_twice_its_own_size_whole() -> None:
    assert split_unit(90, 47) == (90, 0)
    assert split_unit(10, 47) == (10, 0)
