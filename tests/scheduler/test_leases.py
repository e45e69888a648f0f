"""Lease expiry, resumption and reissue."""

from __future__ import annotations

from downpour.scheduler import LeaseView, can_resume, is_expired, should_reissue

CHARLIE, DANA = "charlie-pc", "dana-pc"


def lease(agent: str = CHARLIE, expires_at: float = 130.0, active: bool = True) -> LeaseView:
    return LeaseView("lease-1", "unit-1", agent, expires_at, active)


def test_a_lease_expires_at_its_expiry_time() -> None:
    assert not is_expired(130.0, 129.9)
    assert is_expired(130.0, 130.0)


def test_a_vanished_agents_unit_is_pending_at_most_ttl_plus_reap_interval_later() -> None:
    ttl_s, reap_interval_s = 30.0, 5.0  # LEASE_TTL_S and REAP_INTERVAL_S by default
    last_heartbeat = 100.0
    vanished = last_heartbeat + 0.01  # right after a heartbeat: the worst case
    expires_at = last_heartbeat + ttl_s
    first_reap_after_expiry = expires_at + reap_interval_s - 0.01
    assert is_expired(expires_at, first_reap_after_expiry)
    assert first_reap_after_expiry - vanished <= ttl_s + reap_interval_s == 35.0


def test_an_agent_that_reconnects_in_time_resumes_its_lease() -> None:
    assert can_resume(lease(), CHARLIE, now=125.0)


def test_an_agent_that_reconnects_too_late_does_not() -> None:
    assert not can_resume(lease(), CHARLIE, now=130.0)


def test_another_agent_cannot_resume_a_lease() -> None:
    assert not can_resume(lease(), DANA, now=125.0)


def test_a_reaped_lease_cannot_be_resumed_even_before_its_expiry_time() -> None:
    assert not can_resume(lease(active=False), CHARLIE, now=125.0)


def test_an_expired_leases_unit_is_reissued_unless_done_or_still_running_elsewhere() -> None:
    assert should_reissue(unit_done=False, other_active_copies=0)
    assert not should_reissue(unit_done=True, other_active_copies=0)
    assert not should_reissue(unit_done=False, other_active_copies=1)
