"""The embedded default's stand-in for Celery beat + worker: two daemon threads.

One runs the same actions on the same intervals as the beat schedule in settings, so the
one-command demo behaves like production, minus the extra processes. The other answers the
push path's requests for root references (``store.request_reference``), as the Celery
worker does: run in the pushing thread they would hold the push for a gradient computation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from django.conf import settings
from django.db import close_old_connections

from .actions.evaluations import evaluate_running_jobs
from .actions.jobs import free_finished_stores, start_queued_jobs
from .actions.leases import reap_expired_leases
from .actions.recovery import checkpoint_running_jobs
from .actions.references import publish_reference, push_running_references
from .actions.sync_steps import tick_sync_jobs
from .sandblaster import coordinate_running_jobs
from .spotchecks.replay import run_pending
from .store import reference_requested, take_reference_requests

log = logging.getLogger(__name__)
_started = threading.Event()


def start() -> None:
    if _started.is_set():
        return
    _started.set()
    threading.Thread(target=_loop, name="downpour-embedded-jobs", daemon=True).start()
    threading.Thread(
        target=_references_loop, name="downpour-embedded-references", daemon=True
    ).start()


def _references_loop() -> None:
    while True:
        reference_requested.wait()
        for job_id in take_reference_requests():
            try:
                publish_reference(job_id)  # lowers the job's request flag, whatever happens
            except Exception:
                log.exception("embedded reference of job %s failed", job_id)
            finally:
                close_old_connections()


def _loop() -> None:
    schedule: list[tuple[float, Callable[[], int]]] = [
        (2.0, start_queued_jobs),
        (settings.REFERENCE_INTERVAL_S, push_running_references),
        (settings.REAP_INTERVAL_S, reap_expired_leases),
        (settings.REAP_INTERVAL_S, tick_sync_jobs),
        (settings.REAP_INTERVAL_S, free_finished_stores),
        (settings.EVAL_INTERVAL_S, evaluate_running_jobs),
        (settings.CHECKPOINT_INTERVAL_S, checkpoint_running_jobs),
        (settings.SPOT_CHECK_INTERVAL_S, run_pending),
        (0.0, coordinate_running_jobs),  # Sandblaster: a turn every loop (0.2 s)
    ]
    due = [0.0] * len(schedule)
    while True:
        now = time.monotonic()
        for i, (interval, action) in enumerate(schedule):
            if now >= due[i]:
                due[i] = now + interval
                try:
                    close_old_connections()
                    action()
                except Exception:
                    log.exception("embedded job %s failed", action.__name__)
        time.sleep(0.2)
