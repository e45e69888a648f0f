"""The donors' credit ledger."""

from __future__ import annotations

import pytest

from downpour.scheduler import CreditLedger, credit_for_push

CHARLIE = "charlie-pc"


def test_credit_is_samples_discounted_by_staleness() -> None:
    assert credit_for_push(320, 0, accepted=True) == 320
    assert credit_for_push(320, 3, accepted=True) == 80


def test_a_rejected_push_earns_nothing() -> None:
    assert credit_for_push(320, 0, accepted=False) == 0.0


def test_a_replayed_push_is_counted_once() -> None:
    ledger = CreditLedger()
    assert ledger.record_push(CHARLIE, "lease-1", 0, 320, 1, True) == 160
    assert ledger.record_push(CHARLIE, "lease-1", 0, 320, 1, True) == 0.0
    assert ledger.record_push(CHARLIE, "lease-1", 1, 320, 1, True) == 160
    assert ledger.credit == {CHARLIE: pytest.approx(320)}
    assert ledger.samples_accepted == {CHARLIE: 640}
    assert ledger.duplicates == 1


def test_the_same_seq_in_another_lease_is_a_different_push() -> None:
    ledger = CreditLedger()
    ledger.record_push(CHARLIE, "lease-1", 0, 100, 0, True)
    assert ledger.record_push(CHARLIE, "lease-2", 0, 100, 0, True) == 100


def test_rejected_pushes_leave_no_credit_and_no_samples() -> None:
    ledger = CreditLedger()
    ledger.record_push(CHARLIE, "lease-1", 0, 100, 99, False)
    assert ledger.credit == {} and ledger.samples_accepted == {}
