"""Evaluation: score the current parameters and finish a job on its target or budget."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from django.utils import timezone

from downpour.training.actions.jobs import Evaluated, finish_job
from downpour.training.actions.recovery import checkpoint_job, ensure_store_ready
from downpour.training.models import Evaluation, Job
from downpour.training.store import job_store

log = logging.getLogger(__name__)


def evaluate_job(job: Job) -> Evaluation | None:
    """Score the current parameters on the test split; finish the job on target or budget."""
    from downpour.training.evaluation import evaluate, recalibrated

    ensure_store_ready(job)
    store = job_store(job)
    # The point is stamped when its weights were read, not once they are scored: the curve
    # and the time to target are about the weights, and scoring time (longer for large test
    # sets and recalibrated statistics) is not training time. Samples are read then too.
    read_at = timezone.now()
    samples = Job.objects.values_list("samples_done", flat=True).get(id=job.id)
    # Score a snapshot, so that a new best can be checkpointed as exactly what scored.
    states = store.snapshot()
    statistics = store.statistics_state()
    layout = job.shard_layout()
    weights = layout.merge(
        [layout.unflatten_shard(shard, state.scored) for shard, state in enumerate(states)]
    )
    if statistics is not None:  # BatchNormalization's moving statistics, and the like
        weights |= layout.unflatten_statistics(statistics.values)
        # Measured at these weights: the store's average lags them (evaluation.py says why).
        weights = recalibrated(job, weights)
        measured = {spec.name: weights[spec.name] for spec in layout.statistics}
        statistics = replace(statistics, values=layout.flatten_statistics(measured))
    accuracy, loss = evaluate(job, weights)
    job.refresh_from_db()
    elapsed = (read_at - job.started_at).total_seconds() if job.started_at else 0.0
    point = Evaluation.objects.create(
        job=job,
        elapsed_s=elapsed,
        samples=samples,
        accuracy=accuracy,
        loss=loss,
        versions=[state.version for state in states],
    )
    if job.best_accuracy is None or accuracy > job.best_accuracy:
        Job.objects.filter(id=job.id).update(best_accuracy=accuracy)
        checkpoint_job(job, states, accuracy, statistics)
    scored = Evaluated(weights, accuracy)
    if job.target_accuracy is not None and accuracy >= job.target_accuracy:
        finish_job(job, Job.Status.DONE, f"reached {accuracy:.1%} test accuracy", scored)
    elif job.budget_samples is not None and job.samples_done >= job.budget_samples:
        finish_job(job, Job.Status.DONE, f"used its budget of {job.budget_samples} samples", scored)
    elif job.budget_seconds is not None and _seconds_since(job.started_at) >= job.budget_seconds:
        finish_job(job, Job.Status.DONE, f"used its budget of {job.budget_seconds:.0f} s", scored)
    return point


def _seconds_since(started_at: datetime | None) -> float:
    """Seconds from ``started_at`` to now (the budget runs to now, not to the weights' read)."""
    return (timezone.now() - started_at).total_seconds() if started_at else 0.0


def evaluate_running_jobs() -> int:
    count = 0
    for job in Job.objects.filter(status=Job.Status.RUNNING):
        try:
            evaluate_job(job)
            count += 1
        except Exception:
            log.exception("job %s: evaluation failed", job.id)
    return count
