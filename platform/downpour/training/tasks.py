"""Thin Celery tasks: each calls one action (the embedded runner calls the same ones)."""

from __future__ import annotations

from celery import shared_task

from . import sandblaster
from .actions import evaluations, jobs, leases, recovery, references, sync_steps
from .spotchecks import replay


@shared_task
def start_queued_jobs() -> int:
    return jobs.start_queued_jobs()


@shared_task
def evaluate_running_jobs() -> int:
    return evaluations.evaluate_running_jobs()


@shared_task
def checkpoint_running_jobs() -> int:
    return recovery.checkpoint_running_jobs()


@shared_task
def free_finished_stores() -> int:
    return jobs.free_finished_stores()


@shared_task
def reap_expired_leases() -> int:
    return leases.reap_expired_leases()


@shared_task
def tick_sync_jobs() -> int:
    return sync_steps.tick_sync_jobs()


@shared_task
def run_spot_checks() -> int:
    return replay.run_pending()


@shared_task
def push_reference_gradients() -> int:
    return references.push_running_references()


@shared_task
def publish_reference_gradient(job_id: str, token: str | None = None) -> bool:
    # Sent by name from the push path (store.REFERENCE_TASK) with its flag's token, one per
    # job in flight; expires unstarted after REFERENCE_REQUEST_TTL_S.
    return references.publish_reference(job_id, token)


@shared_task
def coordinate_sandblaster_jobs() -> int:
    # A job-owned loop in the worker: turns every few ms for most of the beat interval.
    from django.conf import settings

    return sandblaster.coordinate_running_jobs(settings.SANDBLASTER_TURN_S)
