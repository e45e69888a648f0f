"""Backup copies of a Sandblaster pass's stragglers (``scheduler.sandblaster``), from rows.

Near the end of a pass, when no unit of it waits and an agent asks for work while holding
none of it, the unit whose oldest lease has run longest beyond the pass's typical unit time
gets a copy for that agent. The first answer wins in the store, the first ``complete``
marks the unit done and supersedes the other copies (``actions.leases``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from datetime import datetime

from django.db.models import F, Max

from downpour import scheduler
from downpour.donors.models import Agent
from downpour.training.models import Job, Lease, WorkUnit

log = logging.getLogger(__name__)

PASS_BACKUP_RULE = scheduler.PassBackupRule()


def current_pass(job: Job) -> int | None:
    """The newest pass of ``job`` that has units, or None."""
    newest = WorkUnit.objects.filter(job=job).aggregate(newest=Max("pass_number"))["newest"]
    return None if newest is None else int(newest)


def pass_backup_unit(agent: Agent, jobs: Iterable[Job], now: datetime) -> WorkUnit | None:
    """A unit of a running pass to copy for ``agent``, or None; counts the backup issued."""
    for job in jobs:
        if job.algorithm != Job.Algorithm.SANDBLASTER:
            continue
        number = current_pass(job)
        if number is None:
            continue
        units = WorkUnit.objects.filter(job=job, pass_number=number)
        pending = units.filter(status=WorkUnit.Status.PENDING).count()
        leases = list(
            Lease.objects.filter(unit__job=job, unit__pass_number=number).select_related("unit")
        )
        active = [
            lease
            for lease in leases
            if lease.status == Lease.Status.ACTIVE and lease.unit.status == WorkUnit.Status.LEASED
        ]
        if pending or any(lease.agent_id == agent.id for lease in active):
            continue
        typical = scheduler.typical_unit_s(
            [
                (lease.ended_at - lease.issued_at).total_seconds()
                for lease in leases
                if lease.status == Lease.Status.COMPLETED and lease.ended_at is not None
            ]
        )
        copies = Counter(lease.unit_id for lease in active)
        for lease in sorted(active, key=lambda lease: lease.issued_at):
            elapsed = (now - lease.issued_at).total_seconds()
            if scheduler.pass_backup_due(
                pending, elapsed, typical, copies[lease.unit_id], PASS_BACKUP_RULE
            ):
                Job.objects.filter(id=job.id).update(
                    sandblaster_backups=F("sandblaster_backups") + 1
                )
                log.info(
                    "sandblaster job %s pass %d: backup copy of unit %s for agent %s",
                    job.id,
                    number,
                    lease.unit_id,
                    agent.id,
                )
                return lease.unit
    return None
