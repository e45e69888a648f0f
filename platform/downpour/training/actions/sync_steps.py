"""Synchronous jobs' steps that time out with nobody left to apply them (Chen et al. 2016).

A step is applied by the push that fills it, or, once its timeout has passed, by the next
push or by the poll of a fetch that waits for it (``agents.syncwait``). When the agents of
a step have all stopped, having ended their leases, left or lost their link, neither comes,
and the gradients already counted (and credited) would sit in the buffer. Beat applies
them here, every ``REAP_INTERVAL_S``.
"""

from __future__ import annotations

import logging

from downpour.paramstore import StoreError
from downpour.training.models import Job
from downpour.training.store import job_sync

log = logging.getLogger(__name__)


def tick_sync_jobs() -> int:
    """Apply each running synchronous job's timed-out steps; returns how many were applied."""
    applied = 0
    for job in Job.objects.filter(status=Job.Status.RUNNING, algorithm=Job.Algorithm.SYNC):
        try:
            applied += _tick(job)
        except Exception:  # a Redis fault, say: the other jobs still get their tick
            log.exception("sync job %s: tick failed", job.id)
    return applied


def _tick(job: Job) -> int:
    sync = job_sync(job)
    if sync is None:
        return 0
    applied = 0
    for shard in range(len(sync.store.layout.shards)):
        try:
            applied += sync.tick(shard)
        except StoreError as exc:  # e.g. not yet restored after a restart
            log.warning("sync job %s shard %d: %s", job.id, shard, exc)
    return applied
