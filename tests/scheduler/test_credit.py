"""The donors' credit per push."""

from __future__ import annotations

from downpour.scheduler import credit_for_push

CHARLIE = "charlie-pc"


def test_credit_is_samples_discounted_by_staleness() -> None:
    assert credit_for_push(320, 0, accepted=True) == 320
    assert credit_for_push(320, 3, accepted=True) == 80


def test_a_rejected_push_earns_nothing() -> None:
    assert credit_for_push(320, 0, accepted=False) == 0.0
