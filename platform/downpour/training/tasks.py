"""Thin Celery tasks: each calls one action (the embedded runner calls the same ones)."""

from __future__ import annotations

from celery import shared_task

from . import actions, spotchecks


@shared_task
def start_queued_jobs() -> int:
    return actions.start_queued_jobs()


@shared_task
def evaluate_running_jobs() -> int:
    return actions.evaluate_running_jobs()


@shared_task
def checkpoint_running_jobs() -> int:
    return actions.checkpoint_running_jobs()


@shared_task
def reap_expired_leases() -> int:
    return actions.reap_expired_leases()


@shared_task
def run_spot_checks() -> int:
    return spotchecks.run_pending()
