"""What one agent socket remembers between messages (the consumer's state, no I/O)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from downpour.paramstore.passes import PassUnit
from downpour.scheduler.reputation import PushFlags, Reputation, record_push
from downpour.training.actions.contributions import Tally
from downpour.training.actions.leases import pass_spec
from downpour.training.models import Job, Lease
from downpour.training.spotchecks.recording import Recording
from downpour_agent.protocol import HeldShards

from .admission import LeaseBounds
from .deltas import BASE_COMPRESSIONS


@dataclass
class CachedLease:
    lease_id: str
    job: Job
    deadline: float  # time.monotonic() after which the lease must be re-read
    bounds: LeaseBounds
    spot_check_round: int | None = None  # the push round a spot check replays, if any
    unit: PassUnit | None = None  # a Sandblaster lease's unit of its pass


def cache_lease(state: SocketState, lease: Lease, ttl_s: float) -> CachedLease:
    """Remember ``lease`` (its job, bounds and pass unit) for ``ttl_s`` seconds."""
    job, unit = lease.unit.job, lease.unit
    bounds = LeaseBounds(unit.steps, lease.push_every, min(job.batch_size, unit.shard.n_samples))
    spec = pass_spec(unit)
    if spec is not None:  # one push round of the whole slice
        bounds = LeaseBounds(1, 1, spec.samples)
    cached = CachedLease(
        str(lease.id),
        job,
        time.monotonic() + ttl_s,
        bounds,
        lease.spot_check_round,
        None if spec is None else PassUnit(spec.pass_number, spec.unit, spec.version, spec.samples),
    )
    state.leases[cached.lease_id] = cached
    return cached


@dataclass
class JobStatus:
    status: str
    checked_at: float


@dataclass
class Authority:
    refusal: dict[str, Any] | None  # the error to close with, or None while allowed
    checked_at: float


#: Leases a socket remembers ending with their job (``SocketState.ended``).
ENDED_LEASES_KEPT = 64


@dataclass
class SocketState:
    leases: dict[str, CachedLease] = field(default_factory=dict)
    # Leases dropped because their job was paused, finished or deleted -> that job, so a
    # late request on one hears why (job_finished) rather than unknown_lease (bounded).
    ended: dict[str, Any] = field(default_factory=dict)
    # Leases this socket completed or returned (bounded): a heartbeat the agent sent before
    # its complete crossed it, and is answered as one naming no lease, not lease_expired.
    settled: dict[str, None] = field(default_factory=dict)
    tallies: dict[str, Tally] = field(default_factory=dict)
    jobs: dict[str, JobStatus] = field(default_factory=dict)
    groups: set[str] = field(default_factory=set)
    last_flush: float = 0.0
    clipped: list[PushFlags] = field(default_factory=list)  # per applied push, robust jobs
    # The agent's reputation as last judged, with ``clipped`` folded in push by push: a
    # ban due shows at the push that makes it, not at the next timed judgement.
    projected: Reputation = field(default_factory=Reputation)
    recordings: dict[str, Recording] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)  # checked leases whose round is in
    authority: Authority | None = None
    closed: bool = False  # the server closed the socket: nothing more is read or sent
    # Fetches with ``min_version``, one per (lease, shard): each polls the store until
    # answered, so their number is what a socket can make the server do unasked.
    waits: dict[tuple[str, int], asyncio.Task[None]] = field(default_factory=dict)
    # Compressions the agent decodes (its ``register``); the weights it holds per lease
    # and shard, for delta fetches of int8 jobs (agents/deltas.py).
    compressions: frozenset[str] = BASE_COMPRESSIONS
    held: HeldShards = field(default_factory=HeldShards)

    def note_push(self, flags: PushFlags) -> None:
        """An applied push of a robust job, pending judgement."""
        self.clipped.append(flags)
        self.projected = record_push(self.projected, flags)

    def judged(self, reputation: Reputation) -> None:
        """The database judged the pending pushes and stored ``reputation``; pushes noted
        since (none while the consumer awaits its own judgement) stay pending."""
        for flags in self.clipped:
            reputation = record_push(reputation, flags)
        self.projected = reputation

    def settle(self, lease_id: str) -> None:
        """The agent completed or returned the lease: drop it, and remember it settled."""
        self.leases.pop(lease_id, None)
        self.recordings.pop(lease_id, None)
        self.settled[lease_id] = None
        while len(self.settled) > ENDED_LEASES_KEPT:
            del self.settled[next(iter(self.settled))]

    def forget_lease(self, lease_id: str) -> None:
        """Drop a lease its job's end took back; remember which job, for late requests
        (and for its waiting fetches, which stop at their next poll and are refused)."""
        cached = self.leases.pop(lease_id, None)
        self.recordings.pop(lease_id, None)  # its checked round will never settle now
        if cached is not None:
            self.ended[lease_id] = cached.job
            while len(self.ended) > ENDED_LEASES_KEPT:
                del self.ended[next(iter(self.ended))]


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def echo_ref(msg: dict[str, Any]) -> dict[str, Any]:
    return {"ref": msg["ref"]} if "ref" in msg else {}
