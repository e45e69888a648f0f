"""The console's totals: what the whole deployment is doing now, read cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count

from downpour.donors.models import Agent
from downpour.training.models import Job, Lease
from downpour.training.store import storage


@dataclass(frozen=True)
class Totals:
    agents_online: int
    agents_banned: int
    samples_per_s: float
    pushes_per_s: float
    active_leases: int
    jobs_by_state: dict[str, int]
    store_bytes: int | None  # None: the backend cannot say


def read_totals(now: datetime) -> Totals:
    """Rates are summed over active leases, each its samples (pushes) over its age so far.

    Work units are short, so a lease's average is close to its agent's rate now.
    """
    leases = Lease.objects.filter(status=Lease.Status.ACTIVE).values_list(
        "issued_at", "samples", "pushes_accepted", "pushes_rejected"
    )
    samples_per_s = pushes_per_s = 0.0
    count = 0
    for issued_at, samples, accepted, rejected in leases:
        age = max((now - issued_at).total_seconds(), 1.0)
        samples_per_s += samples / age
        pushes_per_s += (accepted + rejected) / age
        count += 1
    by_state = {s: 0 for s in Job.Status.values}
    for row in Job.objects.values("status").annotate(n=Count("id")):
        by_state[row["status"]] = row["n"]
    memory_bytes = getattr(storage(), "memory_bytes", None)
    return Totals(
        agents_online=Agent.objects.filter(connected=True, banned_at__isnull=True).count(),
        agents_banned=Agent.objects.filter(banned_at__isnull=False).count(),
        samples_per_s=samples_per_s,
        pushes_per_s=pushes_per_s,
        active_leases=count,
        jobs_by_state=by_state,
        store_bytes=None if memory_bytes is None else int(memory_bytes()),
    )
