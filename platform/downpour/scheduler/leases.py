"""Lease rules: time to live, heartbeats, expiry, resumption and reissue.

A lease gives one agent one work unit until ``expires_at``. Every heartbeat (default
every 10 s) pushes ``expires_at`` to ``now + ttl_s`` (default 30 s), so an agent that
vanishes loses its lease between ``ttl_s - heartbeat_s`` and ``ttl_s`` seconds later.
The reaper, every ``reap_interval_s``, expires such leases and puts their unit back in the
queue unless another copy of it is still running (:mod:`downpour.scheduler.backups`).
An agent that reconnects before its lease has expired resumes it.

Times are seconds on one clock: POSIX timestamps on the server
(``datetime.timestamp()``), simulated seconds in ``bench/simulate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LeaseView:
    """The fields of a lease row that the rules read.

    Attributes
    ----------
    lease_id, unit_id, agent_id : str
    expires_at : float
        Seconds, on the clock of ``now``.
    active : bool
        ``False`` once the lease has completed, been returned, expired or been superseded.
    """

    lease_id: str
    unit_id: str
    agent_id: str
    expires_at: float
    active: bool = True


def is_expired(expires_at: float, now: float) -> bool:
    """Whether a lease that lives until ``expires_at`` has expired at ``now`` (seconds)."""
    return now >= expires_at


def can_resume(lease: LeaseView, agent_id: str, now: float) -> bool:
    """Whether ``agent_id``, reconnecting at ``now``, may carry on with ``lease``.

    Only the agent that holds the lease may resume it, and only while the lease is active
    and not yet expired: once it has expired its unit may already be someone else's.
    """
    return lease.active and lease.agent_id == agent_id and not is_expired(lease.expires_at, now)


def should_reissue(unit_done: bool, other_active_copies: int) -> bool:
    """Whether a unit goes back to the queue when one of its leases expires.

    Not when it is already done, nor while another copy of it (a backup) still runs.
    """
    return not unit_done and other_active_copies == 0
