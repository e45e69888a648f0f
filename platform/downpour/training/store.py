"""The server's handle on the parameter store: picks the backend and opens job stores.

The numeric core (``downpour.paramstore``) knows nothing of Django; this module binds it
to settings (which backend), to the Job row (layout, optimiser) and to checkpoints. It also
remembers, per process, whether each robust job has finished its trusted warm-up, so that
``claim_work`` can ask on every claim.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from typing import Any

from django.conf import settings

from downpour.hotstate import keys
from downpour.hotstate.locks import Turn, lower_flag, raise_flag
from downpour.hotstate.locks import coordinator_lock as redis_coordinator_lock
from downpour.hotstate.locks import restore_lock as redis_restore_lock
from downpour.hotstate.references import LocalReferences, RedisReferences, ReferenceBoard
from downpour.paramstore import (
    AdagradConfig,
    CentredClipping,
    OuterConfig,
    ParameterStore,
    ShardStorage,
    StoreError,
)
from downpour.paramstore.memory import InMemoryStorage
from downpour.paramstore.passes import MemoryPassResults, PassResults
from downpour.paramstore.sync import SyncAggregator, SyncRule

from .models import Job

log = logging.getLogger(__name__)
_lock = threading.Lock()
_stores: dict[str, ParameterStore] = {}


@cache
def storage() -> ShardStorage:
    """The process-wide storage backend: Redis with ``REDIS_URL``, else in memory."""
    if settings.REDIS_URL:
        from downpour.hotstate.store import RedisStorage

        return RedisStorage.from_url(settings.REDIS_URL, prefix=settings.STORE_PREFIX)
    return InMemoryStorage()


@cache
def reference_board() -> ReferenceBoard:
    """Where the worker publishes root reference gradients and pushes read them: Redis with
    ``REDIS_URL`` (shared by every process), else in process (the embedded default)."""
    backend = storage()
    client = getattr(backend, "client", None)
    if client is None:
        return LocalReferences()
    return RedisReferences(client, settings.STORE_PREFIX, settings.REFERENCE_EVERY_VERSIONS)


@cache
def pass_results() -> PassResults:
    """Where Sandblaster's unit answers and coordinator state live: Redis with
    ``REDIS_URL`` (every process sees the same answers), else in process."""
    client = getattr(storage(), "client", None)
    if client is None:
        return MemoryPassResults()
    from downpour.hotstate.passresults import RedisPassResults

    return RedisPassResults(client, settings.STORE_PREFIX)


#: How long a coordinator's lock lives without a renewal; a crashed holder frees it after this.
COORDINATOR_LOCK_TTL_S = 60.0


@contextmanager
def coordinator_lock(job_id: str) -> Iterator[Turn | None]:
    """Held by the one process coordinating a Sandblaster job; yields None (and the caller
    skips its turn) when another holds it. The turn renews it before each write."""
    client = getattr(storage(), "client", None)
    if client is None:
        with _coordinator_lock:
            yield Turn()
        return
    key = f"{settings.STORE_PREFIX}coordinator:{job_id}"
    with redis_coordinator_lock(client, key, COORDINATOR_LOCK_TTL_S) as turn:
        yield turn


_coordinator_lock = threading.Lock()


def root_reference(
    store: ParameterStore, job_id: str, shard: int, trusted: bool, base_version: int
) -> Any:
    """The direction test's root gradient for an untrusted push to a robust job, or None."""
    if store.robust is None or trusted:
        return None
    return reference_board().latest(job_id, shard, store.layout.shard_size(shard), base_version)


# Version-triggered references (docs/robustness.md): a root reference computed on the clock
# alone is hundreds of versions old early in a job, and an IPM push (minus the honest mean)
# then points *with* it. So the push path also asks the worker for one every
# REFERENCE_EVERY_VERSIONS versions of shard 0, one request per job in flight.
_requests_lock = threading.Lock()
_requested: dict[str, float] = {}  # embedded: queued or computing, since (monotonic)
_queued: list[str] = []
#: Set when the embedded default has requests for :func:`take_reference_requests`.
reference_requested = threading.Event()


def request_reference(store: ParameterStore, job_id: str, shard: int, version: int) -> bool:
    """After a push to a robust job was applied at ``version``: ask for a fresh root reference
    when shard 0 reached a multiple of ``REFERENCE_EVERY_VERSIONS`` and none is in flight.

    With Redis the flag is ``SET NX`` and the request a Celery task sent by name (the ASGI
    process has no task modules, and TensorFlow stays out of it); embedded, it is queued for
    the runner's reference thread. Returns whether a request was made.
    """
    every = settings.REFERENCE_EVERY_VERSIONS
    if store.robust is None or not settings.REFERENCE_GRADIENTS or every <= 0:
        return False
    if shard != 0 or version % every:
        return False
    ttl_s = settings.REFERENCE_REQUEST_TTL_S
    client = getattr(storage(), "client", None)
    if client is None:
        now = time.monotonic()
        with _requests_lock:
            # A request older than the TTL stops blocking, as the Redis flag would.
            if now - _requested.get(job_id, -math.inf) < ttl_s:
                return False
            _requested[job_id] = now
            _queued.append(job_id)
        reference_requested.set()
        return True
    key = keys.reference_request_key(settings.STORE_PREFIX, job_id)
    token = None
    try:  # the push is applied: a Redis or broker fault must not fail it
        token = raise_flag(client, key, ttl_s)
        if token is None:
            return False
        from downpour.celery import app

        # A request the worker cannot start within the TTL is dropped: another has been
        # sent since, and tasks must not pile up behind a slow worker.
        app.send_task(REFERENCE_TASK, args=[job_id, token], expires=ttl_s)
    except Exception:
        log.exception("job %s: root reference request not sent", job_id)
        if token is not None:
            with suppress(Exception):
                lower_flag(client, key, token)
        return False
    return True


#: The worker's task for :func:`request_reference` (``training/tasks.py``).
REFERENCE_TASK = "downpour.training.tasks.publish_reference_gradient"


def take_reference_requests() -> list[str]:
    """Embedded: the jobs whose references were requested since the last call."""
    with _requests_lock:
        taken = list(_queued)
        _queued.clear()
        reference_requested.clear()
    return taken


def reference_request_done(job_id: str, token: str | None = None) -> None:
    """The requested reference of ``job_id`` is published (or given up): take requests again.

    With Redis, ``token`` is the flag's (sent with the task); a flag raised since, after this
    one expired, stays up.
    """
    client = getattr(storage(), "client", None)
    if client is None:
        with _requests_lock:
            _requested.pop(job_id, None)
        return
    if token is not None:
        lower_flag(client, keys.reference_request_key(settings.STORE_PREFIX, job_id), token)


_restore_lock = threading.Lock()
#: Longest a restore may hold the cross-process lock; a crashed holder frees it after this.
RESTORE_LOCK_TTL_S = 120.0


@contextmanager
def restore_lock(job_id: str) -> Iterator[None]:
    """Held while this process restores a job's store after a restart.

    Within a process a thread lock; with Redis also a Redis lock per job, so that of several
    daphne or Celery processes that find the store empty at once, one restores and the
    others, once it is released, find the store ready. Two restores racing would both
    requeue units and the later would overwrite pushes applied after the earlier.
    """
    with _restore_lock:
        client = getattr(storage(), "client", None)
        if client is None:
            yield
            return
        with redis_restore_lock(client, settings.STORE_PREFIX, job_id, RESTORE_LOCK_TTL_S):
            yield


def job_store(job: Job) -> ParameterStore:
    """The ParameterStore of ``job`` (cached per process; the layout never changes)."""
    key = str(job.id)
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = ParameterStore(
                storage(),
                key,
                job.shard_layout(),
                AdagradConfig(learning_rate=job.learning_rate),
                max_staleness=job.max_staleness,
                staleness_aware=job.staleness_aware_lr,
                robust=CentredClipping() if job.robust_aggregation else None,
                max_grad_norm=job.max_grad_norm,
                outer=outer_config(job),
                average=job.weight_average if job.averaged else 0.0,
            )
            _stores[key] = store
        return store


def outer_config(job: Job) -> OuterConfig | None:
    """The outer optimizer of a local-steps job's store; None for other algorithms."""
    if job.algorithm != Job.Algorithm.LOCAL_STEPS:
        return None
    return OuterConfig(job.outer_learning_rate, job.outer_momentum)


_syncs: dict[str, SyncAggregator] = {}


def job_sync(job: Job) -> SyncAggregator | None:
    """The synchronous step rule of a ``sync`` job (cached per process); None otherwise."""
    if job.algorithm != Job.Algorithm.SYNC:
        return None
    store = job_store(job)
    with _lock:
        sync = _syncs.get(str(job.id))
        if sync is None or sync.store is not store:
            rule = SyncRule(job.sync_workers, job.sync_backups, job.sync_step_timeout_s)
            sync = _syncs[str(job.id)] = SyncAggregator(store, rule)
        return sync


def forget_job_store(job_id: str) -> None:
    with _lock:
        _stores.pop(str(job_id), None)
        _syncs.pop(str(job_id), None)
    forget_warmup(job_id)
    reference_board().forget(str(job_id))
    with _requests_lock:
        _requested.pop(str(job_id), None)


#: Seconds a process keeps a reading that a robust job is still warming up.
WARMUP_TTL_S = 1.0
#: ...and one that it is warm. Trusted pushes only add up, so warm stays warm, except after
#: a restore from a checkpoint taken during warm-up (or without robust state). The process
#: that restores forgets its reading at once; the others catch up within this time, and
#: until then untrusted pushes to the job are held: work wasted, never harm done.
WARM_TTL_S = 30.0
_warmup_lock = threading.Lock()
_warmup: dict[str, tuple[bool, float]] = {}  # job id -> (warming up, time.monotonic() read)


def warming_up(job: Job) -> bool:
    """Whether a robust job still holds untrusted pushes, as this process last read it.

    False for a job without centred clipping. Reads only the shards' robust statistics
    (``ParameterStore.warmup_status``), at most once per ``WARMUP_TTL_S`` while the job
    warms up and once per ``WARM_TTL_S`` after. A job whose shards are not in the store (a
    restart, before the restore) counts as warming up: trusted agents only, to be safe.
    """
    if not job.robust_aggregation:
        return False
    if job.layout is None:
        return True  # not started: no store yet
    key = str(job.id)
    now = time.monotonic()
    with _warmup_lock:
        known = _warmup.get(key)
    if known is not None:
        warming, read_at = known
        if now - read_at < (WARMUP_TTL_S if warming else WARM_TTL_S):
            return warming
    try:
        status = job_store(job).warmup_status()
    except StoreError:
        status = None
    warming = status is None or not status.warm
    with _warmup_lock:
        _warmup[key] = (warming, now)
    return warming


def forget_warmup(job_id: object) -> None:
    """Drop this process's reading of the job's warm-up (after a restore, or a delete)."""
    with _warmup_lock:
        _warmup.pop(str(job_id), None)
