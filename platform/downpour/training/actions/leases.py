"""Leases after they are issued: the lease message, heartbeats, resume, complete, return, reap."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from downpour import scheduler
from downpour.donors.models import Agent
from downpour.training.actions.claims import host_record, record_lease_rate
from downpour.training.actions.pass_answers import unit_answered
from downpour.training.models import Job, Lease, SpotCheck, WorkUnit
from downpour_agent.protocol import (
    ERROR_TEXTS,
    DatasetSpec,
    ErrorCode,
    Hyper,
    LeaseSpec,
    LocalSteps,
    PassSpec,
    lease_to_wire,
)

log = logging.getLogger(__name__)


class LeaseError(Exception):
    """A lease request refused with a wire code; the text defaults to the code's standard one."""

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        self.code = code
        self.message = ERROR_TEXTS[code] if message is None else message
        super().__init__(self.message)


def lease_message(lease: Lease, base_url_path: str = "/api/agent/shards/") -> dict[str, Any]:
    """The protocol ``lease`` message for ``lease``."""
    unit = lease.unit
    job = unit.job
    layout = job.shard_layout()
    local = None
    if job.algorithm == Job.Algorithm.LOCAL_STEPS:
        local = LocalSteps(job.inner_optimizer, job.inner_learning_rate)
    spec = LeaseSpec(
        lease_id=str(lease.id),
        job_id=str(job.id),
        work_unit_id=str(unit.id),
        steps=unit.steps,
        seed=unit.seed,
        model=job.model_config,
        loss=job.loss,
        hyper=Hyper(
            batch_size=job.batch_size,
            # A local-steps round is H inner steps and fetches once, at its start.
            n_fetch=job.n_fetch if local is None else lease.push_every,
            n_push=lease.push_every,
            learning_rate=job.learning_rate,
            compression=job.compression,
        ),
        dataset=DatasetSpec(
            url=f"{base_url_path}{unit.shard_id}/",
            sha256=unit.shard.sha256,
            n_samples=unit.shard.n_samples,
        ),
        layout=[[(v.name, tuple(v.shape), v.dtype) for v in shard] for shard in layout.shards],
        expires_in_s=settings.LEASE_TTL_S,
        statistics=[(v.name, tuple(v.shape), v.dtype) for v in layout.statistics],
        local_steps=local,
        algorithm=job.algorithm,
        sandblaster=pass_spec(unit),
    )
    return lease_to_wire(spec)


def pass_spec(unit: WorkUnit) -> PassSpec | None:
    """A Sandblaster unit's place in its pass; None for any other unit."""
    if unit.pass_number is None:
        return None
    assert unit.pass_unit is not None and unit.pinned_version is not None
    assert unit.sample_start is not None and unit.sample_stop is not None
    return PassSpec(
        unit.pass_number, unit.pass_unit, unit.sample_start, unit.sample_stop, unit.pinned_version
    )


def get_agent_lease(lease_id: str, agent: Agent) -> Lease:
    """The active lease ``lease_id`` of ``agent``, or a :class:`LeaseError` with its code."""
    try:
        uuid.UUID(lease_id)
    except (ValueError, TypeError, AttributeError):
        raise LeaseError(ErrorCode.UNKNOWN_LEASE, "a lease id is a UUID") from None
    lease = Lease.objects.select_related("unit__job", "unit__shard").filter(id=lease_id).first()
    if lease is None:
        raise LeaseError(ErrorCode.UNKNOWN_LEASE, f"no lease {lease_id}")
    if lease.agent_id != agent.id:
        raise LeaseError(ErrorCode.LEASE_NOT_YOURS)
    if lease.unit.job.is_finished:
        raise LeaseError(ErrorCode.JOB_FINISHED)
    if lease.unit.job.status == Job.Status.PAUSED:
        raise LeaseError(ErrorCode.JOB_PAUSED)
    if lease.status != Lease.Status.ACTIVE or lease.expires_at <= timezone.now():
        raise LeaseError(ErrorCode.LEASE_EXPIRED)
    return lease


def heartbeat(agent: Agent, lease_id: str | None) -> float | None:
    """Mark the agent alive and extend its lease; returns the lease's seconds to live."""
    now = timezone.now()
    Agent.objects.filter(id=agent.id).update(last_seen_at=now, connected=True)
    if lease_id is None:
        return None
    get_agent_lease(lease_id, agent)
    extended = Lease.objects.filter(
        id=lease_id, agent=agent, status=Lease.Status.ACTIVE, expires_at__gt=now
    ).update(expires_at=now + timedelta(seconds=settings.LEASE_TTL_S), heartbeat_at=now)
    if extended != 1:
        raise LeaseError(ErrorCode.LEASE_EXPIRED)
    return settings.LEASE_TTL_S


def complete_lease(agent: Agent, lease_id: str, samples: int) -> None:
    """End a lease as done; refused unless its pushes arrived (see :func:`check_complete`)."""
    lease = get_agent_lease(lease_id, agent)
    check_complete(lease, samples)
    answered = unit_answered(lease.unit)
    now = timezone.now()
    with transaction.atomic():
        done = Lease.objects.filter(id=lease.id, status=Lease.Status.ACTIVE).update(
            status=Lease.Status.COMPLETED, ended_at=now
        )
        if done != 1:
            raise LeaseError(ErrorCode.LEASE_EXPIRED)
        unit = WorkUnit.objects.filter(id=lease.unit_id)
        if not answered:  # a Sandblaster unit with a shard unanswered: it is done again
            unit.update(status=WorkUnit.Status.PENDING, done_at=None)
            log.warning("lease %s completed without an answer in every shard", lease.id)
        else:
            unit.update(status=WorkUnit.Status.DONE, done_at=now)
            # Backup copies of this unit lost the race: their remaining pushes are refused.
            Lease.objects.filter(unit_id=lease.unit_id, status=Lease.Status.ACTIVE).update(
                status=Lease.Status.SUPERSEDED, ended_at=now
            )
        _record_outcome(str(agent.id), completed=True)
        record_lease_rate(str(agent.id), lease, now)


def lease_size(lease: Lease) -> int:
    """Samples a lease covers: its steps × the batch its agent draws (at most the shard)."""
    unit = lease.unit
    if unit.sample_start is not None and unit.sample_stop is not None:
        return unit.sample_stop - unit.sample_start  # a Sandblaster unit: its slice
    return int(unit.steps * min(unit.job.batch_size, unit.shard.n_samples))


def check_complete(lease: Lease, samples: int) -> None:
    """A ``complete`` must follow pushes of the whole lease (``steps × batch`` samples), claim
    the samples they covered, and come after the spot-checked round (if any) arrived in
    full; the text does not say which round that is.

    Raises
    ------
    LeaseError
        ``bad_message``.
    """
    size = lease_size(lease)
    if lease.samples_pushed == 0:
        raise LeaseError(ErrorCode.BAD_MESSAGE, "complete: no push of this lease has arrived")
    if samples != lease.samples_pushed or samples != size:
        raise LeaseError(
            ErrorCode.BAD_MESSAGE,
            f"complete: {samples} samples claimed; this lease's pushes covered "
            f"{lease.samples_pushed} of its {size}",
        )
    if lease.spot_check_round is not None and not SpotCheck.objects.filter(lease=lease).exists():
        raise LeaseError(
            ErrorCode.BAD_MESSAGE, "complete: a round of this lease has not arrived in full"
        )


def _record_outcome(agent_id: str, completed: bool) -> None:
    """Update the agent's host record (call inside a transaction)."""
    agent = Agent.objects.select_for_update().get(id=agent_id)
    record = scheduler.record_outcome(host_record(agent), completed)
    Agent.objects.filter(id=agent_id).update(
        leases_completed=record.completed,
        leases_abandoned=record.abandoned,
        consecutive_completed=record.consecutive_completed,
        unit_scale=record.unit_scale,
    )


def resume_lease(agent: Agent, lease_id: str) -> Lease:
    """An agent that reconnected in time takes its lease back (same agent, still live)."""
    lease = get_agent_lease(lease_id, agent)
    now = timezone.now()
    view = scheduler.LeaseView(
        str(lease.id), str(lease.unit_id), str(lease.agent_id), lease.expires_at.timestamp()
    )
    if not scheduler.can_resume(view, str(agent.id), now.timestamp()):
        raise LeaseError(ErrorCode.LEASE_EXPIRED)
    extended = Lease.objects.filter(
        id=lease.id, agent=agent, status=Lease.Status.ACTIVE, expires_at__gt=now
    ).update(
        expires_at=now + timedelta(seconds=settings.LEASE_TTL_S),
        heartbeat_at=now,
        resumed=F("resumed") + 1,
    )
    if extended != 1:
        raise LeaseError(ErrorCode.LEASE_EXPIRED)
    lease.refresh_from_db()
    return lease


def return_lease(agent: Agent, lease_id: str) -> None:
    lease = get_agent_lease(lease_id, agent)
    with transaction.atomic():
        returned = Lease.objects.filter(id=lease.id, status=Lease.Status.ACTIVE).update(
            status=Lease.Status.RETURNED, ended_at=timezone.now()
        )
        others = Lease.objects.filter(unit_id=lease.unit_id, status=Lease.Status.ACTIVE).count()
        if returned == 1 and scheduler.should_reissue(False, others):
            WorkUnit.objects.filter(id=lease.unit_id, status=WorkUnit.Status.LEASED).update(
                status=WorkUnit.Status.PENDING
            )


def _abandoned_by_agent(lease: Lease) -> bool:
    """An expired lease counts against its agent only if the job was still running: a
    lease of a paused or stopped job was refused by the server, not dropped by the donor."""
    return Job.objects.filter(id=lease.unit.job_id, status=Job.Status.RUNNING).exists()


def reap_expired_leases() -> int:
    """Expire leases whose heartbeats stopped and put their units back in the queue."""
    now = timezone.now()
    reaped = 0
    for lease in Lease.objects.filter(
        status=Lease.Status.ACTIVE, expires_at__lte=now
    ).select_related("unit"):
        with transaction.atomic():
            if (
                Lease.objects.filter(id=lease.id, status=Lease.Status.ACTIVE).update(
                    status=Lease.Status.EXPIRED, ended_at=now
                )
                != 1
            ):
                continue
            others = Lease.objects.filter(unit_id=lease.unit_id, status=Lease.Status.ACTIVE).count()
            done = WorkUnit.objects.filter(id=lease.unit_id, status=WorkUnit.Status.DONE).exists()
            if scheduler.should_reissue(done, others):
                WorkUnit.objects.filter(id=lease.unit_id, status=WorkUnit.Status.LEASED).update(
                    status=WorkUnit.Status.PENDING
                )
            if _abandoned_by_agent(lease):
                _record_outcome(str(lease.agent_id), completed=False)
            reaped += 1
    if reaped:
        log.info("reaped %d expired leases", reaped)
    return reaped
