"""The server's handle on the parameter store: picks the backend and opens job stores.

The numeric core (``downpour.paramstore``) knows nothing of Django; this module binds it
to settings (which backend), to the Job row (layout, optimiser) and to checkpoints.
"""

from __future__ import annotations

import threading
from functools import cache

from django.conf import settings

from downpour.paramstore import (
    AdagradConfig,
    CentredClipping,
    ParameterStore,
    ShardLayout,
    ShardStorage,
)
from downpour.paramstore.memory import InMemoryStorage

from .models import Job

_lock = threading.Lock()
_stores: dict[str, ParameterStore] = {}


@cache
def storage() -> ShardStorage:
    """The process-wide storage backend: Redis with ``REDIS_URL``, else in memory."""
    if settings.REDIS_URL:
        from downpour.redisstore import RedisStorage

        return RedisStorage.from_url(settings.REDIS_URL, prefix=settings.STORE_PREFIX)
    return InMemoryStorage()


def job_store(job: Job) -> ParameterStore:
    """The ParameterStore of ``job`` (cached per process; the layout never changes)."""
    key = str(job.id)
    with _lock:
        store = _stores.get(key)
        if store is None:
            if job.layout is None:
                raise ValueError(f"job {job.id} has no parameter layout yet")
            store = ParameterStore(
                storage(),
                key,
                ShardLayout.from_json(job.layout),
                AdagradConfig(learning_rate=job.learning_rate),
                max_staleness=job.max_staleness,
                staleness_aware=job.staleness_aware_lr,
                robust=CentredClipping() if job.robust_aggregation else None,
            )
            _stores[key] = store
        return store


def forget_job_store(job_id: str) -> None:
    with _lock:
        _stores.pop(str(job_id), None)
