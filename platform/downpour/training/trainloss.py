"""Agents' training loss over time, per job, for the job page's chart.

Kept in the cache (Redis in production, process memory on the embedded default), not in
the database: it is a display aid, and losing it costs a line on a chart. Each consumer
appends its agents' mean loss when it records their tallies (every couple of seconds);
two consumers appending at once may drop one point, which the chart can spare.
"""

from __future__ import annotations

import time

from django.core.cache import cache

#: Points kept per job (the newest).
MAX_POINTS = 2000
#: Seconds a job's series outlives its last point.
KEEP_S = 7 * 24 * 3600


def _key(job_id: object) -> str:
    return f"trainloss:{job_id}"


def record_training_loss(job_id: object, loss: float, at: float | None = None) -> None:
    """Append ``(unix time, loss)`` to the job's series."""
    points: list[list[float]] = cache.get(_key(job_id)) or []
    points.append([time.time() if at is None else at, float(loss)])
    cache.set(_key(job_id), points[-MAX_POINTS:], KEEP_S)


def training_loss(job_id: object) -> list[list[float]]:
    """The job's ``[unix time, loss]`` points, oldest first."""
    return list(cache.get(_key(job_id)) or [])
