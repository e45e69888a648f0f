"""What the pages read: summaries of jobs and of the fleet, computed from rows and the store."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Q

from downpour import scheduler
from downpour.paramstore import StoreError
from downpour.training.models import Job, Lease, SpotCheck
from downpour.training.specs import model_spec
from downpour.training.store import job_store
from downpour_agent.modelspec.validator import uses_dropout


def staleness_summary(job: Job) -> dict[str, Any]:
    """p50/p95 of the job's accepted pushes' staleness (versions behind at apply time)."""
    histogram = scheduler.StalenessHistogram({int(k): v for k, v in job.staleness_hist.items()})
    total = sum(histogram.counts.values())
    if not total:
        return {"pushes": 0, "p50": None, "p95": None}
    return {"pushes": total, "p50": histogram.p50, "p95": histogram.p95}


def robust_summary(job: Job) -> dict[str, Any] | None:
    """What the job page says about centred clipping: warm-up progress, or clipped share.

    None for a job without it. Read fresh from the store (statistics only), not cached.
    """
    if not job.robust_aggregation:
        return None
    status = None
    if job.layout is not None:
        try:
            status = job_store(job).warmup_status()
        except StoreError:  # not in the store (yet, or any more)
            status = None
    if status is None:
        return {"warm": None, "text": "robust: on"}
    if not status.warm:
        progress = f"{status.progress}/{status.required}"
        return {
            "warm": False,
            "trusted_pushes": status.progress,
            "required": status.required,
            "text": f"waiting for trusted agents: {progress} trusted pushes",
        }
    return {
        "warm": True,
        "clipped_fraction": status.clipped_fraction,
        "text": f"robust: warm, {status.clipped_fraction:.1%} of pushes clipped",
    }


def robust_jobs_waiting() -> list[dict[str, Any]]:
    """Running robust jobs still warming up, for the operators: they need a trusted agent."""
    waiting = []
    jobs = Job.objects.filter(status=Job.Status.RUNNING, robust_aggregation=True)
    for job in jobs.select_related("owner").order_by("created_at"):
        summary = robust_summary(job)
        if summary is not None and not summary["warm"]:
            waiting.append({"job": job, "text": summary["text"]})
    return waiting


def fairness_windows(
    now: datetime, window_s: float = 60.0, windows: int = 10
) -> list[dict[str, Any]]:
    """Jain's index of compute per researcher, normalised by share weight, per window.

    Compute is the samples of leases that ended in each window (and, for the newest
    window, of active leases), counted for researchers that had a running job.
    """
    start = now - timedelta(seconds=window_s * windows)
    rows = Lease.objects.filter(Q(status=Lease.Status.ACTIVE) | Q(ended_at__gte=start)).values_list(
        "status", "samples", "ended_at", "unit__job__owner_id", "unit__job__owner__share_weight"
    )
    running = dict(
        Job.objects.filter(status=Job.Status.RUNNING).values_list("owner_id", "owner__share_weight")
    )
    per_window: list[dict[int, float]] = [dict.fromkeys(running, 0.0) for _ in range(windows)]
    weights = dict(running)
    for status, samples, ended_at, owner_id, weight in rows:
        at = now if status == Lease.Status.ACTIVE or ended_at is None else ended_at
        index = min(windows - 1, int((at - start).total_seconds() // window_s))
        if index < 0:
            continue
        per_window[index][owner_id] = per_window[index].get(owner_id, 0.0) + samples
        weights[owner_id] = weight
    return [
        {
            "ends_s_ago": window_s * (windows - 1 - i),
            "jain": scheduler.jain_index(alloc, {k: weights[k] for k in alloc}) if alloc else None,
            "researchers": len(alloc),
        }
        for i, alloc in enumerate(per_window)
    ]


def spot_check_summary(job: Job) -> dict[str, Any]:
    """What the job page shows: the fraction, whether the model can be checked, verdicts."""
    counts = dict(SpotCheck.objects.filter(job=job).values_list("status").annotate(n=Count("id")))
    return {
        "fraction": job.spot_check_fraction,
        "recomputable": not uses_dropout(model_spec(job)),
        "passed": counts.get(SpotCheck.Status.PASSED, 0),
        "failed": counts.get(SpotCheck.Status.FAILED, 0),
        "pending": counts.get(SpotCheck.Status.QUEUED, 0) + counts.get(SpotCheck.Status.RUNNING, 0),
    }
