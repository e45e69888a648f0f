"""What one agent socket remembers between messages (the consumer's state, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from downpour.training.actions.contributions import Tally
from downpour.training.models import Job
from downpour.training.spotchecks.recording import Recording

from .admission import LeaseBounds


@dataclass
class CachedLease:
    lease_id: str
    job: Job
    deadline: float  # time.monotonic() after which the lease must be re-read
    bounds: LeaseBounds
    spot_check_round: int | None = None  # the push round a spot check replays, if any


@dataclass
class JobStatus:
    status: str
    checked_at: float


@dataclass
class Authority:
    refusal: dict[str, Any] | None  # the error to close with, or None while allowed
    checked_at: float


@dataclass
class SocketState:
    leases: dict[str, CachedLease] = field(default_factory=dict)
    tallies: dict[str, Tally] = field(default_factory=dict)
    jobs: dict[str, JobStatus] = field(default_factory=dict)
    groups: set[str] = field(default_factory=set)
    last_flush: float = 0.0
    clipped: list[bool] = field(default_factory=list)  # per applied push of robust jobs
    recordings: dict[str, Recording] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)  # checked leases whose round is in
    authority: Authority | None = None
    closed: bool = False  # the server closed the socket: nothing more is read or sent
