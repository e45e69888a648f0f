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
class LeaseTerms:
    """How long leases live and how often they must be renewed.

    Attributes
    ----------
    ttl_s : float
        Seconds a lease lives after it is issued or last renewed (``LEASE_TTL_S``).
    heartbeat_s : float
        Seconds between an agent's heartbeats (``HEARTBEAT_INTERVAL_S``); < ``ttl_s``.
    reap_interval_s : float
        Seconds between runs of the reaper (``REAP_INTERVAL_S``).
    """

    ttl_s: float = 30.0
    heartbeat_s: float = 10.0
    reap_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError(
                f"need 0 < heartbeat_s < ttl_s, got heartbeat_s={self.heartbeat_s}, "
                f"ttl_s={self.ttl_s}"
            )
        if not self.reap_interval_s > 0:
            raise ValueError(f"reap_interval_s must be > 0, got {self.reap_interval_s}")

    def expiry_after(self, now: float) -> float:
        """``expires_at`` for a lease issued or renewed at ``now`` (seconds)."""
        return now + self.ttl_s

    @property
    def max_reissue_delay_s(self) -> float:
        """Longest time, in seconds, from an agent vanishing to its unit being pending.

        The agent may vanish just after a heartbeat, so its lease lives ``ttl_s`` more;
        the reaper may then run up to ``reap_interval_s`` later.
        """
        return self.ttl_s + self.reap_interval_s


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
